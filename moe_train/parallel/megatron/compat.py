"""The one module that knows how Megatron-Core versions differ (0.16.1, the last for Python 3.11, vs 0.19).

Every other file of moe_train.parallel.megatron goes through these helpers instead of testing versions itself.
Features are detected by introspection (a name or a keyword exists), not by comparing version strings, so a
back-port or a dev build takes the right branch. The differences that matter here:

  what                              0.16.1                                      0.19 (main, 2026)
  --------------------------------  ------------------------------------------  ------------------------------------
  router builder call               router(config=, pg_collection=)             router(config=, pg_collection=,
                                                                                is_mtp_layer=)
  MoELayer.__init__                 (config, submodules, layer_number,          + is_mtp_layer
                                    pg_collection)
  MoESubmodules.experts             a ModuleSpec (built with build_module)      an ExpertsBuilder callable
  per-layer loss logging            moe_utils.save_to_aux_losses_tracker(       moe_logging.get_moe_metrics_tracker()
                                    ..., reduce_group_has_dp=)                  .record(..., needs_dp_avg=)
  logging row of an MTP layer       layer_number (Megatron's own TODO)          layer_number + config.num_layers
  default process groups            moe_utils.get_default_pg_collection()       the same, or ProcessGroupCollection
                                                                                .use_mpu_process_groups()

Our router accepts ``is_mtp_layer`` as a keyword in both versions; our MoELayer subclass forwards whatever keywords
its Megatron base takes (``moe_layer_kwargs``). The 0.19 column was read from Megatron-LM's public sources and
API docs, not run here (0.17+ needs Python >= 3.12): tests fake those branches.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from typing import Any, Callable, Optional

try:
    import megatron.core as _mcore
    from megatron.core.transformer.moe import moe_utils as _moe_utils
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as e:  # one clear message, raised when moe_train.parallel.megatron is imported
    raise ImportError(
        f"moe_train.parallel.megatron needs NVIDIA Megatron-Core (import failed: {e}). Install it with "
        "`pip install megatron-core` (0.16.1 is the last release for Python 3.11; it needs no other torch), "
        "or `pip install moe_train[megatron]`.") from e

MCORE_VERSION: str = getattr(_mcore, "__version__", "unknown")


# --------------------------------------------------------------------------------------------------------------
# process groups


def default_pg_collection():
    """Megatron's process groups from its global parallel_state (what MoELayer uses when given none)."""
    getter = getattr(_moe_utils, "get_default_pg_collection", None)
    if getter is not None:
        return getter()
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def pg_size(group) -> int:
    """Size of a process group; 1 for None (Megatron passes None for absent groups in some builds)."""
    if group is None:
        return 1
    return group.size()


# --------------------------------------------------------------------------------------------------------------
# per-layer loss logging (Megatron's tracker, so its logging, reduction and loss scaling see our terms)


_LOGGING_MODULE = "megatron.core.transformer.moe.moe_logging"
_logging_module_missing = False  # remembered so that 0.16.1 does not retry a failed import every forward


def _metrics_tracker():
    """0.19: the MoEMetricsTracker; None on 0.16.1 (no moe_logging module)."""
    global _logging_module_missing
    mod = sys.modules.get(_LOGGING_MODULE)
    if mod is None and not _logging_module_missing:
        try:
            mod = importlib.import_module(_LOGGING_MODULE)
        except ImportError:
            _logging_module_missing = True
    get = getattr(mod, "get_moe_metrics_tracker", None) if mod is not None else None
    return get() if get is not None else None


def record_moe_metric(name: str, value, layer_number: Optional[int], num_layers: int, reduce_group=None,
                      reduce_group_has_dp: bool = False) -> None:
    """Adds ``value`` (detached by Megatron) to row ``layer_number - 1`` of Megatron's per-layer tracker ``name``.

    ``reduce_group``: group the value is summed over when logged (e.g. tp x cp); the tracker then averages over
    data parallel unless ``reduce_group_has_dp``. Skipped by Megatron itself when layer_number is None.
    """
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name, value, layer_number, num_layers, reduce_group=reduce_group,
                       needs_dp_avg=not reduce_group_has_dp)
        return
    _moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers, reduce_group=reduce_group,
                                          reduce_group_has_dp=reduce_group_has_dp)


def moe_metric_values(name: str):
    """The per-layer values Megatron's tracker holds for ``name`` (a [num_layers] tensor; KeyError when absent)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        return tracker.metrics[name].values
    return _moe_utils.get_moe_layer_wise_logging_tracker()[name]["values"]


def clear_moe_metrics() -> None:
    """Empties Megatron's per-layer tracker, entries included (0.16.1: its dict; 0.19: MoEMetricsTracker.metrics,
    its dict: the tracker's own clear() only zeroes values and keeps each entry's num_layers, and 0.19's
    get_moe_layer_wise_logging_tracker returns a fresh copy whose clear() changes nothing)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.metrics.clear()
    else:
        _moe_utils.get_moe_layer_wise_logging_tracker().clear()


def logging_layer_number(layer_number: Optional[int], is_mtp_layer: bool, config) -> Optional[int]:
    """The tracker row of a layer: MTP layers log after the decoder's num_layers rows (as 0.19 does)."""
    if layer_number is None or not is_mtp_layer:
        return layer_number
    return layer_number + config.num_layers


def tracker_num_layers(config) -> int:
    return config.num_layers + (config.mtp_num_layers or 0)


def aux_loss_autoscaler():
    """The autograd function that injects a loss term's gradient where its activation's gradient passes."""
    return _moe_utils.MoEAuxLossAutoScaler


# --------------------------------------------------------------------------------------------------------------
# MoELayer construction


def accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def moe_layer_kwargs(base_init: Callable, **kwargs) -> dict:
    """The keywords (e.g. 0.19's ``is_mtp_layer``) that ``base_init`` accepts; a keyword it does not know is
    dropped only when it carries its default (False/None), otherwise it is a user request this version cannot
    honour and raises."""
    out = {}
    for key, value in kwargs.items():
        if accepts_keyword(base_init, key):
            out[key] = value
        elif value not in (None, False):
            raise ValueError(f"{key}={value!r} is not supported by Megatron-Core {MCORE_VERSION}'s MoELayer")
    return out


# --------------------------------------------------------------------------------------------------------------
# layer specs: find Megatron's MoE layer spec anywhere in a layer / block / MTP spec and replace its parts


def is_moe_spec(spec: Any) -> bool:
    """A ModuleSpec building a (subclass of) MoELayer with MoESubmodules, in any version."""
    if isinstance(spec, ModuleSpec):
        module = spec.module
        return isinstance(module, type) and issubclass(module, MoELayer) and isinstance(spec.submodules,
                                                                                        MoESubmodules)
    if isinstance(spec, functools.partial):  # a builder form: partial(MoELayer, submodules=...)
        func = spec.func
        return (isinstance(func, type) and issubclass(func, MoELayer)
                and isinstance(spec.keywords.get("submodules"), MoESubmodules))
    return False


def replace_moe_spec(spec: Any, router: Callable, layer_cls: Optional[type], layer_params: dict) -> Any:
    """A copy of one MoE spec with ``router`` as MoESubmodules.router and, when given, ``layer_cls`` built
    instead of MoELayer with ``layer_params`` as extra constructor keywords. Experts / shared experts are kept
    exactly as Megatron's spec had them (ModuleSpec in 0.16.1, builders in 0.19)."""
    if isinstance(spec, ModuleSpec):
        subs = dataclasses.replace(spec.submodules, router=router)
        params = dict(spec.params or {})
        params.update(layer_params)
        return dataclasses.replace(spec, module=layer_cls or spec.module, submodules=subs, params=params)
    assert isinstance(spec, functools.partial)
    keywords = dict(spec.keywords)
    keywords["submodules"] = dataclasses.replace(keywords["submodules"], router=router)
    keywords.update(layer_params)
    return functools.partial(layer_cls or spec.func, *spec.args, **keywords)


def moe_spec_parts(spec: Any) -> tuple[type, Any]:
    """(layer class, MoESubmodules) of one MoE spec in either form: 0.16.1's ModuleSpec(module=MoELayer,
    submodules=...) or 0.19's MLP builder functools.partial(MoELayer, submodules=...) (what a GPT layer spec's
    ``submodules.mlp`` holds)."""
    assert is_moe_spec(spec), f"not an MoE spec: {spec!r}"
    if isinstance(spec, ModuleSpec):
        return spec.module, spec.submodules
    return spec.func, spec.keywords["submodules"]


def build_moe_layer(spec: Any, **kwargs) -> Any:
    """Builds one MoE spec of either form with Megatron's constructor keywords (config=, pg_collection=, ...):
    build_module for a ModuleSpec (0.16.1), a call for a builder partial (0.19, as its TransformerLayer does)."""
    if isinstance(spec, ModuleSpec):
        from megatron.core.transformer.spec_utils import build_module

        return build_module(spec, **kwargs)
    assert is_moe_spec(spec), f"not an MoE spec: {spec!r}"
    return spec(**kwargs)


def map_moe_specs(spec: Any, fn: Callable[[Any], Any], _depth: int = 0) -> tuple[Any, int]:
    """Returns (a copy of ``spec`` with every MoE spec s replaced by fn(s), number replaced).

    Walks ModuleSpec.submodules, dataclass fields (TransformerLayerSubmodules, TransformerBlockSubmodules, ...),
    lists and tuples, so layer specs, decoder block specs and MTP block specs all work.
    """
    assert _depth < 32, "spec nesting deeper than 32: a cycle?"
    if is_moe_spec(spec):
        return fn(spec), 1
    if isinstance(spec, ModuleSpec):
        subs, n = map_moe_specs(spec.submodules, fn, _depth + 1)
        return (dataclasses.replace(spec, submodules=subs) if n else spec), n
    if isinstance(spec, (list, tuple)):
        items, total = [], 0
        for item in spec:
            new, n = map_moe_specs(item, fn, _depth + 1)
            items.append(new)
            total += n
        return (type(spec)(items) if total else spec), total
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes, total = {}, 0
        for f in dataclasses.fields(spec):
            if not f.init:
                continue
            new, n = map_moe_specs(getattr(spec, f.name), fn, _depth + 1)
            if n:
                changes[f.name] = new
                total += n
        return (dataclasses.replace(spec, **changes) if total else spec), total
    return spec, 0
