"""Hugging Face checkpoint interchange: Mixtral / Qwen2-MoE / DeepSeek-V2 / V3 folders (config.json + safetensors) <-> MoETransformer.

    from_hf(folder)       config.json -> ModelConfig, safetensors (one file or shards + index) -> our tensors
    to_hf(model, folder)  the reverse, written atomically (temp folder beside it, then swapped into place)

The parts, one job each:
    io/hf_config.py          config.json <-> ModelConfig (the full MoEConfig rides under the "moe_train" key)
    io/hf_weights.py         HF tensor names <-> our state dict (per-expert or fused experts, router extras)
    io/safetensors_folder.py reading single / sharded safetensors folders, planning shards, writing them
    io/atomic.py             the atomic folder write
A model saved by to_hf with a plain top-k router loads in transformers (AutoModelForCausalLM); null gates,
allocators and the MoEConfig are extras only from_hf reads, so from_hf rebuilds exactly the router that was saved.
A router transformers does not have (null experts, Ada-K, top-p, an expert bias it ignores) makes the export carry
its own modeling code, loaded with trust_remote_code=True (io/hf_remote); to_hf logs which loaders run the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from moe_train.config import ModelConfig
from moe_train.io.atomic import write_folder_atomically
from moe_train.io.hf_common import CONFIG_NAME, read_hf_config
from moe_train.io.hf_config import config_from_hf, config_to_hf, write_hf_config
from moe_train.io.hf_deepseek import num_mtp_layers
from moe_train.io.hf_remote import loaders_message, remote_code_reason, remote_config, write_export_files
from moe_train.io.hf_weights import (
    WeightImporter,
    export_head,
    export_layer,
    export_state_dict,
    export_tail,
    import_state_dict,
    skip_mtp_layers,
)
from moe_train.io.safetensors_folder import (
    SafetensorsFolder,
    SafetensorsHeaders,
    copy_non_weight_files,
    parse_shard_size,
    write_safetensors_stream,
)
from moe_train.model.decoder import MoETransformer, layer_class
from moe_train.model.rope import rotary_for

logger = logging.getLogger(__name__)


def check_hf(path: Union[str, Path]) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder, after checking everything from_hf needs without reading a weight:
    config.json present, parseable and supported, every safetensors file complete (its header and size), every
    tensor present with the shape config.json implies and none left over. ValueError naming the file otherwise."""
    folder = Path(path)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, f"{folder / CONFIG_NAME}")
    with torch.device("meta"):
        expected = MoETransformer(cfg).state_dict()
    imp = WeightImporter(SafetensorsHeaders(folder), None, folder)
    import_state_dict(imp, cfg, expected)  # meta tensors: shapes only
    skip_mtp_layers(imp, cfg, num_mtp_layers(hf))
    imp.check_all_used(cfg.family)
    return cfg


def from_hf(path: Union[str, Path], dtype: Optional[torch.dtype] = torch.float32) -> MoETransformer:
    """Builds a MoETransformer from a Hugging Face Mixtral / Qwen2-MoE folder.

    ``dtype``: every floating tensor is cast to it; None keeps the stored dtype. The model is built on the meta
    device and the loaded tensors are assigned into it (no random init, no second full copy of the weights).
    """
    folder = Path(path)
    cfg = check_hf(folder)  # config, file completeness and every shape, before any weight is read
    with torch.device("meta"):
        skeleton = MoETransformer(cfg)
    expected = skeleton.state_dict()
    with ExitStack() as stack:
        imp = WeightImporter(SafetensorsFolder(folder, stack), dtype, folder)
        sd = import_state_dict(imp, cfg, expected)
        skip_mtp_layers(imp, cfg, num_mtp_layers(read_hf_config(folder)))
        imp.check_all_used(cfg.family)
    assert set(sd) == set(expected), sorted(set(sd) ^ set(expected))
    skeleton.load_state_dict(sd, strict=True, assign=True)
    model = skeleton
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True made two Parameters of one tensor
    # Non-persistent buffers are not in a checkpoint: recompute them off the meta device (fp32 RoPE table).
    model.rotary = rotary_for(cfg)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"from_hf left tensors on the meta device: {left}"
    return model


def to_hf(model: MoETransformer, path: Union[str, Path], max_shard_size: Union[int, str] = "5GB",
          extra_config: Optional[dict] = None, carry_from: Iterable[Union[str, Path]] = ()) -> Path:
    """Writes ``model`` as a Hugging Face folder (config.json + safetensors, sharded with an index when the
    weights exceed ``max_shard_size``); returns the folder. A plain top-k model loads in transformers
    (AutoModelForCausalLM); null gates, allocators and the MoEConfig are extras only from_hf reads.

    ``extra_config``: more config.json keys (e.g. bos/eos token ids) that must not clash with ours.
    ``carry_from``: folders whose non-weight files (tokenizer, ...) are copied in; an existing ``path`` always is.
    """
    if not isinstance(model, MoETransformer):
        raise ValueError(f"to_hf expects a moe_train MoETransformer, got {type(model).__name__}")
    state = model.state_dict()
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    return to_hf_stream(model.config, specs, state.__getitem__, path, max_shard_size, extra_config, carry_from)


def to_hf_stream(cfg: ModelConfig, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 get: Callable[[str], torch.Tensor], path: Union[str, Path], max_shard_size: Union[int, str] = "5GB",
                 extra_config: Optional[dict] = None, carry_from: Iterable[Union[str, Path]] = ()) -> Path:
    """to_hf for a model that no process holds whole: ``specs`` (our state-dict name -> (shape, dtype)) lays the
    folder out, then ``get(name)`` supplies our tensors one decoder layer at a time (e.g. ModelFileReader.get, which
    reads them from a model.pt), each layer converted to the family's names and written before the next is read:
    peak memory is one layer."""
    limit = parse_shard_size(max_shard_size)
    with torch.device("meta"):
        skeleton = MoETransformer(cfg)
    skeleton.load_state_dict({n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in
                              specs.items()}, assign=True)
    hf = config_to_hf(cfg, skeleton.embed_tokens.weight.dtype)
    for key, value in (extra_config or {}).items():
        if key in hf and hf[key] != value:
            raise ValueError(f"extra_config[{key!r}]={value!r} clashes with the exported config ({hf[key]!r})")
        hf[key] = value
    # Which loaders run it (io/hf_remote): a router transformers lacks ships its own modeling code. The expert
    # biases are read ahead (E numbers per layer) since a zero one changes nothing in transformers' routing.
    bias_names = [n for n in specs if n.endswith("moe.router.expert_bias")]
    remote = remote_code_reason(cfg, any(bool(get(n).abs().sum() > 0) for n in bias_names))
    if remote is not None:
        hf = remote_config(hf, cfg)
    hf_specs = {name: (tuple(t.shape), t.dtype) for name, t in export_state_dict(skeleton).items()}

    def part(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """``module`` of the skeleton with our real tensors under ``prefix`` assigned in (its own copy)."""
        names = [k for k in module.state_dict()]
        module.load_state_dict({k: get(prefix + k) for k in names}, assign=True)
        return module

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with torch.device("meta"):
            head = MoETransformer(dataclasses.replace(cfg, num_layers=0))
        head.load_state_dict({n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in
                              specs.items() if not n.startswith("layers.")}, assign=True)
        part(head.embed_tokens, "embed_tokens.")
        yield from export_head(head).items()
        for i in range(cfg.num_layers):
            with torch.device("meta"):
                layer = layer_class(cfg)(cfg, i)
            yield from export_layer(part(layer, f"layers.{i}."), cfg, i).items()
        part(head.norm, "norm.")
        if not cfg.tie_word_embeddings:
            part(head.lm_head, "lm_head.")
        yield from export_tail(head).items()

    dst = Path(path)
    sources = [dst, *carry_from]  # the old folder's tokenizer etc. first; later folders win

    def write(folder: Path) -> None:
        copy_non_weight_files(sources, folder)
        write_hf_config(folder, hf)
        write_export_files(folder, hf)  # modeling code (remote exports), generation_config.json
        write_safetensors_stream(folder, hf_specs, tensors(), limit)

    with warnings.catch_warnings():
        if remote is not None:  # the shipped code routes with the expert bias: hf_weights' "transformers ignores it"
            warnings.filterwarnings("ignore", message=r"layer \d+: the .*expert bias is nonzero")
        out = write_folder_atomically(dst, write)
    (logger.info if remote is None else logger.warning)(loaders_message(cfg, remote, out))
    return out
