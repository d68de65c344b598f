"""AdaMoE conversion (arXiv 2406.13233): turn a pretrained top-k MoE into a null-expert model.

Every layer's top-k router becomes a NullExpertRouter with the SAME true gate W_g, m null experts whose gate is
W_null = W_g repeated r = m/n times (each true expert starts with r null twins of equal logit), and a larger k over
the n + m experts. The experts, attention and embeddings are untouched. baseline_top_k (the FLOPs baseline)
defaults to the original k; e.g. Mixtral-8x7B: n=8, top-2 -> m=16, k=4, baseline 2.

Function preservation (``null_tie_break``, config.NULL_TIE_BREAKS). Twins tie bit for bit (the router computes
true and null logits in one GEMM). Under the default ``true_first`` a true expert ranks before its twins, so before
any training a token picks its best true expert, that expert's r twins, its second true expert, ...: ceil(k/(r+1))
true experts, the original router's best ones, with the original gates once renormalised over the true picks. The
converted model then computes the original model's function exactly when ceil(k/(r+1)) equals the original top_k
and the gates are renormalised (norm_topk_prob); any other request is refused with the values that would work.
``null_tie_break="topk"`` is the authors' recipe as released: the same exact twins, ties left to torch.topk (the
true experts a token gets at step 0 then depend on device and dtype), and no such check. An aux-loss-free expert
bias carried over from the source (aux-loss-free balancing, DeepSeek-V3's e_score_correction_bias) is given to
each null twin too (NullExpertRouter.null_expert_bias, fixed), so twins still tie with their true expert. Sigmoid
scores (DeepSeek-V3) do not depend on the other experts, so such a conversion is function-preserving whatever
norm_topk_prob; under softmax the n + m experts scale every probability by 1/(r+1) but not the bias, so the step-0
selection can then differ from the source's (logged). Group-limited routing: a twin is eligible exactly when its
true expert's group is (routing/scores.py, docs/families.md), so the conversion is function-preserving there too.

    add_null_experts(model, m, k)                 in place on a loaded model (returns it)
    convert_to_adamoe(src, dst, m, k)             Hugging Face folder -> converted Hugging Face folder

A source that already routes over null experts that return something (LongCat-Flash's identity zero-computation
experts) gets nothing added: convert_to_adamoe re-writes it (our config extras included) when m, k and the null kind
asked for are the model's own, and refuses naming the model's count, k and kind otherwise (check_existing_nulls).

Shape legend: E = n true experts, Z = m null experts, D hidden.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Union

import torch

from moe_train.config import NULL_TIE_BREAKS, ConfigError, MoEConfig, validate_model, validate_moe
from moe_train.io.hf import to_hf_stream
from moe_train.io.hf_common import read_hf_config
from moe_train.io.hf_config import config_from_hf
from moe_train.io.safetensors_folder import stored_dtype
from moe_train.io.sources import HFSource, meta_model_with_routers
from moe_train.model.decoder import MoETransformer
from moe_train.routing.null_experts import NullExpertRouter
from moe_train.routing.registry import router_class

logger = logging.getLogger(__name__)

# config.json keys of the source that the export does not produce but a converted model should keep.
_CARRIED_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_conversion(moe: MoEConfig, num_null_experts: int, top_k: int, baseline_top_k: Optional[int] = None,
                     null_tie_break: str = "true_first", null_kind: str = "zero") -> MoEConfig:
    """The converted MoEConfig, or ValueError naming the argument and what is allowed (no work done). Under
    ``null_tie_break="true_first"`` the conversion must be function-preserving (module docstring). Only
    ``null_kind="zero"`` converts (docs/zero_compute.md): an identity / constant null pick contributes its gate
    times x or v and the gates renormalise over all k picks, so twin-initialised nulls change every token's output."""
    n = moe.num_experts
    if null_kind != "zero":
        raise ValueError(f"null_kind={null_kind!r}: AdaMoE conversion of a top-k model is function-preserving only "
                         f"for null_kind 'zero' (a {null_kind!r} null pick adds its gate times "
                         f"{'x' if null_kind == 'identity' else 'a learned vector'}, and the gates then normalise "
                         "over every pick, so twin-initialised null experts would change each token's output); "
                         "convert with null_kind: zero, or train a model with this kind from the start")
    has_nulls = router_class(moe.router) is NullExpertRouter
    if moe.router not in NullExpertRouter.converts_from:
        raise ValueError(f"AdaMoE conversion starts from a top-k model; this model's router is {moe.router!r}"
                         + (f" with {moe.num_null_experts} null experts already" if has_nulls else "")
                         + (f" (of kind {moe.null_kind!r}, as LongCat-Flash's zero-computation experts: steer their "
                            "share with model.moe.target_true_experts instead)" if moe.null_kind != "zero" else ""))
    if not _is_int(num_null_experts) or num_null_experts < 1:
        raise ValueError(f"num_null_experts={num_null_experts!r} must be an integer >= 1")
    if num_null_experts % n:
        raise ValueError(f"num_null_experts={num_null_experts} must be a multiple of the {n} true experts (the null "
                         f"gate starts as the true gate repeated m/n times), e.g. {n}, {2 * n} or {4 * n}")
    if not _is_int(top_k) or not 1 <= top_k <= n + num_null_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, {n + num_null_experts}] "
                         f"(the {n} true + {num_null_experts} null experts)")
    baseline = moe.top_k if baseline_top_k is None else baseline_top_k
    if not _is_int(baseline) or not 1 <= baseline <= n:
        raise ValueError(f"baseline_top_k={baseline_top_k!r} must be an integer in [1, {n}] (the top-k the FLOPs "
                         f"are reported against; default: the original top_k={moe.top_k})")
    if null_tie_break not in NULL_TIE_BREAKS:
        raise ValueError(f"null_tie_break={null_tie_break!r} must be one of {NULL_TIE_BREAKS}")
    if null_tie_break == "true_first":
        r = num_null_experts // n
        start = math.ceil(top_k / (r + 1))  # true experts per token before training (module docstring)
        authors = ("null_tie_break='topk' (model.moe.null_tie_break: topk, moe-train convert --null-tie-break "
                   "topk: the authors' exact twins, not function-preserving)")
        if not moe.norm_topk_prob and moe.score_func == "softmax":  # sigmoid scores do not see the null experts
            raise ValueError("this model keeps its raw top-k probabilities (norm_topk_prob false), which the softmax "
                             f"over {n} + {num_null_experts} experts scales by 1/{r + 1}: the conversion cannot be "
                             f"function-preserving; to convert anyway pass {authors}")
        if start != moe.top_k:
            raise ValueError(
                f"top_k={top_k} with {num_null_experts} null experts ({r} twins per true expert) is not "
                f"function-preserving: a token starts with ceil({top_k}/{r + 1}) = {start} true experts, not this "
                f"model's top_k={moe.top_k}; use top_k in [{(moe.top_k - 1) * (r + 1) + 1}, {moe.top_k * (r + 1)}] "
                f"for {num_null_experts} null experts, or pass {authors}")
    # a source with an expert bias keeps one, and its null twins get the same bias (NullExpertRouter.null_expert_bias)
    new = dataclasses.replace(moe, router=NullExpertRouter.name, num_null_experts=num_null_experts, top_k=top_k,
                              baseline_top_k=baseline, null_tie_break=null_tie_break,
                              use_expert_bias=moe.use_expert_bias or moe.expert_bias_rate > 0)
    try:
        validate_moe(new)
    except ConfigError as e:
        raise ValueError(f"the converted MoE config is invalid: {e}") from None
    return new


@torch.no_grad()
def swap_routers(model: MoETransformer, new_moe: MoEConfig, router_cls, init) -> MoETransformer:
    """Replaces every layer's router with ``router_cls(D, new_moe)``, built for real (it is small, so every buffer
    starts at its own initial value) on the old gate's device and dtype, holding a copy of the old true gate with its
    requires_grad and the old training mode; ``init(old, new)`` sets what the new router adds. Updates
    ``model.config`` and returns the same model. Build optimizers afterwards: the routers are new modules."""
    try:  # the family's own rules too (e.g. LongCat-Flash's null experts are identity experts), before any change
        validate_model(dataclasses.replace(model.config, moe=new_moe))
    except ConfigError as e:
        raise ValueError(f"the converted model is invalid: {e}") from None
    D = model.config.hidden_size
    for layer in model.moe_layers():  # DeepSeek's dense-first layers have no router
        old = layer.moe.router
        gate = old.gate.weight
        new = router_cls(D, new_moe).to(device=gate.device, dtype=gate.dtype)
        new.gate.weight.copy_(gate)
        new.gate.weight.requires_grad_(gate.requires_grad)
        init(old, new)
        new.train(old.training)
        layer.moe.router = new
    model.config = dataclasses.replace(model.config, moe=new_moe)
    return model


def add_null_experts(model: MoETransformer, num_null_experts: int, top_k: int,
                     baseline_top_k: Optional[int] = None, null_tie_break: str = "true_first",
                     null_kind: str = "zero") -> MoETransformer:
    """Replaces every layer's top-k router with a NullExpertRouter (true gate kept, null gate = W_g repeated m/n
    times), updates ``model.config``, and returns the same model. Function-preserving under the default
    ``null_tie_break`` (else ValueError, see the module docstring)."""
    new_moe = check_conversion(model.config.moe, num_null_experts, top_k, baseline_top_k, null_tie_break, null_kind)

    def init(old, new):
        new.init_null_gate_from_true()
        new.null_gate.weight.requires_grad_(old.gate.weight.requires_grad)
        if old.expert_bias is not None:  # aux-loss-free balancing state / DeepSeek-V3's correction bias
            new.expert_bias.copy_(old.expert_bias)
            # each twin selects with its true expert's bias, so it ties with it (and ranks after it) at step 0
            new.null_expert_bias.copy_(old.expert_bias.repeat(new.num_null // new.num_experts))
            if null_tie_break == "true_first" and bool(old.expert_bias.any()) and new_moe.score_func == "softmax":
                logger.warning("softmax over the %d true + %d null experts divides every probability by %d but not "
                               "the expert bias: the converted model's step-0 selection can differ from the "
                               "source's (sigmoid scores, as DeepSeek-V3's, are unaffected)", new.num_experts,
                               new.num_null, new.num_null // new.num_experts + 1)

    return swap_routers(model, new_moe, NullExpertRouter, init)


def check_existing_nulls(moe: MoEConfig, num_null_experts: int, top_k: int, null_kind: Optional[str],
                         baseline_top_k: Optional[int] = None) -> MoEConfig:
    """A model that has null experts already (router null): its MoEConfig (with ``baseline_top_k`` when given) if
    the request is what it has, else ValueError naming the model's count, k and kind (module docstring)."""
    assert router_class(moe.router) is NullExpertRouter, moe.router
    have = (moe.num_null_experts, moe.top_k, moe.null_kind)
    want = (num_null_experts, top_k, moe.null_kind if null_kind is None else null_kind)
    if want != have:
        raise ValueError(f"this model already routes over {have[0]} null experts of kind {have[2]!r} with top_k="
                         f"{have[1]} (as LongCat-Flash's zero-computation experts); AdaMoE conversion adds none to it: "
                         f"ask for num_null_experts={have[0]}, top_k={have[1]}, null_kind={have[2]!r} to re-write it "
                         f"as is (asked: num_null_experts={want[0]}, top_k={want[1]}, null_kind={want[2]!r})")
    new = moe if baseline_top_k is None else dataclasses.replace(moe, baseline_top_k=baseline_top_k)
    try:
        validate_moe(new)
    except ConfigError as e:
        raise ValueError(f"the converted MoE config is invalid: {e}") from None
    return new


def convert_to_adamoe(src: Union[str, Path], dst: Union[str, Path], num_null_experts: int, top_k: int,
                      baseline_top_k: Optional[int] = None, max_shard_size: Union[int, str] = "5GB",
                      null_tie_break: str = "true_first", null_kind: Optional[str] = None) -> Path:
    """Hugging Face top-k checkpoint ``src`` -> AdaMoE checkpoint ``dst`` (from_hf + add_null_experts + to_hf).

    Arguments are validated against src's config.json before any weight is read. Weights keep their stored
    dtype; the tokenizer and other non-weight files of ``src`` are copied along, with its token ids. ``dst`` is
    written atomically and may equal ``src``. Returns ``dst`` as a Path. ``null_kind``: None = zero for a top-k
    source, the model's own for one with null experts (re-written as is, module docstring).
    """
    src, dst = Path(src), Path(dst)
    hf = read_hf_config(src)
    moe = config_from_hf(hf, str(src / "config.json")).moe
    # the family's own null experts (LongCat-Flash's identity ones; AdaMoE's zero ones are refused)
    existing = router_class(moe.router) is NullExpertRouter and moe.null_kind != "zero"
    if existing:
        new_moe = check_existing_nulls(moe, num_null_experts, top_k, null_kind, baseline_top_k)
    else:
        kind = "zero" if null_kind is None else null_kind
        check_conversion(moe, num_null_experts, top_k, baseline_top_k, null_tie_break, kind)
    dtype = stored_dtype(src)
    extra = {key: hf[key] for key in _CARRIED_HF_KEYS if key in hf}
    # Streamed: the routers are read and converted whole (they are small), every other tensor is read, cast and
    # written a decoder layer at a time; peak memory is one layer, not the model.
    with ExitStack() as stack:
        source = HFSource(src, stack)
        model = meta_model_with_routers(source)
        if existing:
            model.config = dataclasses.replace(model.config, moe=new_moe)
        else:
            add_null_experts(model, num_null_experts, top_k, baseline_top_k, null_tie_break, kind)
        routers = {f"layers.{i}.moe.router.{rel}": t.detach() for i, layer in enumerate(model.layers)
                   if layer.moe is not None for rel, t in layer.moe.router.state_dict().items()}
        specs = {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
                 for name, t in model.state_dict().items()}

        def get(name: str) -> torch.Tensor:
            t = routers[name] if name in routers else source.get(name)
            return t.to(specs[name][1])

        return to_hf_stream(model.config, specs, get, dst, max_shard_size=max_shard_size, extra_config=extra,
                            carry_from=[src])
