"""The architecture record: a model's structure as JSON, so ``load`` rebuilds it without pickle.

A record has two parts (see ``docs/FORMAT.md``):

- ``builder``: for an :class:`~nncompress.models.base.ArchModule` (a class with a string
  ``arch_name`` and an ``arch_config()`` method), ``{"name": arch_name, "config": {...}}``;
  on load the class comes from the caller's ``builders`` or from
  ``nncompress.models.ARCHITECTURES`` and is called as ``cls(**config)``. For any other
  ``nn.Module``: ``{"name": null, "class": "module.Class"}`` (informational only); loading
  it needs a freshly constructed ``skeleton``.
- ``modules``: ``{path: {"type": ..., "args": ...}}`` for submodules that directly own
  parameters or buffers (:func:`describe` lists them all; ``save`` keeps only those that
  differ from the builder's own construction, see :mod:`nncompress.formats.assemble`).
  Types in :data:`MODULE_TYPES` record their constructor arguments; on load, a module
  whose built spec differs from the recorded one (e.g. a structurally pruned Linear with
  fewer ``out_features``, or a Linear recorded as the ``LowRankLinear`` that replaced it)
  is replaced by one constructed from the recorded, validated args, parents before
  children. Other types record ``"args": null`` and must match the built model's type
  exactly.

Nothing from a file is ever imported, evaluated or unpickled: only classes named in
:data:`MODULE_TYPES`, in ``builders`` or in the architecture registry are ever called.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncompress.errors import FormatError
from nncompress.formats._checks import (
    check_bool,
    check_dict,
    check_float,
    check_int,
    check_keys,
    check_list,
    check_str,
    fail,
    short,
)
from nncompress.lowrank.layers import (
    RNN_MODES,
    LowRankConv1d,
    LowRankConv2d,
    LowRankLinear,
    LowRankRNN,
)
from nncompress.modules.attention import (
    ACTIVATIONS,
    SplitMultiheadAttention,
    SplitTransformerEncoderLayer,
)
from nncompress.share.hashing import HashedEmbedding, HashedLinear

__all__ = ["ARCH_PROVIDERS", "MODULE_TYPES", "ArchRecord", "build_module", "complete_args",
           "describe", "inherited_args", "module_args", "module_spec", "parse_record",
           "qualname", "same_class"]

Validator = Callable[[Any, str], Any]
_MAX_WIDTH = 2**31


def _int(value: Any, what: str) -> int:
    return check_int(value, what, hi=_MAX_WIDTH)


def _signed(value: Any, what: str) -> int:
    return check_int(value, what, lo=-64, hi=64)


def _positive(value: Any, what: str) -> int:
    return check_int(value, what, lo=1, hi=_MAX_WIDTH)


def _ints(value: Any, what: str) -> list[int]:
    return [_int(v, what) for v in check_list(value, what, max_len=8)]


def _padding(value: Any, what: str) -> str | list[int]:
    if value in ("same", "valid"):
        return value
    return _ints(value, what)


def _optional(check: Validator) -> Validator:
    return lambda value, what: None if value is None else check(value, what)


def _choice(*options: str) -> Validator:
    def check(value: Any, what: str) -> str:
        if value not in options:
            fail(f"{what} must be one of {', '.join(options)}; got {short(value)}")
        return value
    return check


def _fraction(value: Any, what: str) -> float:
    number = check_float(value, what)
    if not 0.0 <= number <= 1.0:
        fail(f"{what} must be between 0 and 1, got {number}")
    return number


def _names(value: Any, what: str) -> list[str]:
    return [check_str(v, what) for v in check_list(value, what, max_len=100_000)]


_CONV = {"in_channels": _int, "out_channels": _int, "kernel_size": _ints, "stride": _ints,
         "padding": _padding, "dilation": _ints, "groups": _positive, "bias": check_bool,
         "padding_mode": _choice("zeros", "reflect", "replicate", "circular")}
_NORM = {"num_features": _int, "eps": check_float, "momentum": _optional(check_float),
         "affine": check_bool, "track_running_stats": check_bool}
_LOW_RANK_CONV = {"rank": _positive, **{k: v for k, v in _CONV.items() if k != "groups"}}
_RNN = {"input_size": _int, "hidden_size": _int, "num_layers": _positive, "bias": check_bool,
        "batch_first": check_bool, "dropout": _fraction, "bidirectional": check_bool}

#: The one table of constructible layer types: name -> (class, {constructor arg: check}).
#: Only these are ever constructed from a file's args; each arg is read from the attribute
#: of the same name (``bias`` from whether the module has one).
MODULE_TYPES: dict[str, tuple[type[nn.Module], dict[str, Validator]]] = {
    "Linear": (nn.Linear, {"in_features": _int, "out_features": _int, "bias": check_bool}),
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "BatchNorm1d": (nn.BatchNorm1d, _NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _NORM),
    "LayerNorm": (nn.LayerNorm, {"normalized_shape": _ints, "eps": check_float,
                                 "elementwise_affine": check_bool, "bias": check_bool}),
    "GroupNorm": (nn.GroupNorm, {"num_groups": _positive, "num_channels": _int,
                                 "eps": check_float, "affine": check_bool}),
    "InstanceNorm1d": (nn.InstanceNorm1d, _NORM),
    "InstanceNorm2d": (nn.InstanceNorm2d, _NORM),
    "RMSNorm": (nn.RMSNorm, {"normalized_shape": _ints, "eps": _optional(check_float),
                             "elementwise_affine": check_bool}),
    "Embedding": (nn.Embedding, {"num_embeddings": _int, "embedding_dim": _int,
                                 "padding_idx": _optional(_int),
                                 "max_norm": _optional(check_float), "norm_type": check_float,
                                 "scale_grad_by_freq": check_bool, "sparse": check_bool}),
    # a layer removed by surgery (e.g. a BatchNorm folded into its convolution)
    "Identity": (nn.Identity, {}),
    "GRU": (nn.GRU, _RNN),
    "LSTM": (nn.LSTM, {**_RNN, "proj_size": _int}),
    "RNN": (nn.RNN, {**_RNN, "nonlinearity": _choice("tanh", "relu")}),
    # factorised layers (nncompress.lowrank): rebuilt parent first, then their children
    "LowRankLinear": (LowRankLinear, {"in_features": _int, "out_features": _int,
                                      "rank": _positive, "bias": check_bool}),
    "LowRankConv1d": (LowRankConv1d, _LOW_RANK_CONV),
    "LowRankConv2d": (LowRankConv2d, _LOW_RANK_CONV),
    "LowRankRNN": (LowRankRNN, {"mode": _choice(*RNN_MODES), "input_size": _int,
                                "rank": _positive, "hidden_size": _int, "bias": check_bool,
                                "batch_first": check_bool, "proj_size": _int}),
    # hashed weight sharing (nncompress.share.hashing): index/sign buffers are rebuilt
    "HashedLinear": (HashedLinear, {"in_features": _positive, "out_features": _positive,
                                    "buckets": _positive, "seed": _int, "bias": check_bool}),
    "HashedEmbedding": (HashedEmbedding, {"num_embeddings": _positive, "embedding_dim": _positive, "buckets": _positive, "seed": _int, "padding_idx": _optional(_int)}),  # noqa: E501
    # rewritten attention built-ins (nncompress.modules): rebuilt parent first, then children
    "SplitMultiheadAttention": (SplitMultiheadAttention, {
        "embed_dim": _positive, "num_heads": _positive, "head_dim": _positive,
        "kdim": _positive, "vdim": _positive, "bias": check_bool, "dropout": _fraction,
        "batch_first": check_bool}),
    "SplitTransformerEncoderLayer": (SplitTransformerEncoderLayer, {
        "d_model": _positive, "nhead": _positive, "dim_feedforward": _positive,
        "dropout_p": _fraction, "activation_name": _choice(*ACTIVATIONS),
        "layer_norm_eps": check_float, "batch_first": check_bool, "norm_first": check_bool,
        "bias": check_bool}),
    # containers: a recorded child list lets a model whose layers were removed (layer
    # pruning) load into a skeleton that still has them (the extra children are dropped)
    "ModuleList": (nn.ModuleList, {"children": _names}),
    "Sequential": (nn.Sequential, {"children": _names}),
    # parameter-free operations, for builders that record their own structure (they own no
    # tensors, so files never record them in "modules")
    "ReLU": (nn.ReLU, {}),
    "Tanh": (nn.Tanh, {}),
    "Sigmoid": (nn.Sigmoid, {}),
    "GELU": (nn.GELU, {"approximate": _choice("none", "tanh")}),
    "LeakyReLU": (nn.LeakyReLU, {"negative_slope": check_float}),
    "Flatten": (nn.Flatten, {"start_dim": _signed, "end_dim": _signed}),
    "Dropout": (nn.Dropout, {"p": _fraction}),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, {"output_size": _positive}),
    "MaxPool1d": (nn.MaxPool1d, {"kernel_size": _positive, "stride": _positive,
                                 "padding": _int}),
    "AvgPool1d": (nn.AvgPool1d, {"kernel_size": _ints, "stride": _ints, "padding": _ints}),
}
_TYPE_NAMES = {cls: name for name, (cls, _) in MODULE_TYPES.items()}
#: modules that register architectures outside ``nncompress.models`` (imported on demand)
ARCH_PROVIDERS = ("nncompress.share.zipped", "nncompress.share.composite")


@dataclass(frozen=True)
class ArchRecord:
    """A validated architecture record (``builder`` part plus ``modules``)."""

    name: str | None                      # builder name (None: a user model)
    config: dict[str, Any] | None         # builder kwargs
    class_name: str | None                # informational class name of a user model
    modules: dict[str, tuple[str, dict[str, Any] | None]]   # path -> (type, args)
    #: paths whose args are partial: the rest come from the module built at the path
    partial: frozenset[str] = frozenset()


#: container types whose "children" arg is read from the container, not an attribute
CONTAINERS = ("ModuleList", "Sequential")


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def same_class(recorded: str, cls: type) -> bool:
    """Whether a recorded class name names ``cls``: the same qualified name, or the same
    class where one side was defined in a script (``__main__``) and the other imported
    from its module."""
    if recorded == qualname(cls):
        return True
    suffix = f".{cls.__qualname__}"
    if not recorded.endswith(suffix):
        return False
    return "__main__" in (recorded[:-len(suffix)], cls.__module__)


def _json_value(value: Any) -> Any:
    if isinstance(value, (tuple, list, torch.Size)):
        return [_json_value(v) for v in value]
    return value


def module_args(module: nn.Module, type_name: str) -> dict[str, Any]:
    """The constructor args of table type ``type_name`` as ``module`` has them: each from
    the attribute of the same name (``bias``: whether it has one); absent ones left out."""
    if type_name in CONTAINERS:
        return {"children": list(module._modules)}
    args = {}
    for key in MODULE_TYPES[type_name][1]:
        if not hasattr(module, key):
            continue
        value = getattr(module, key)
        if key == "bias" and not isinstance(value, bool):
            value = value is not None
        args[key] = _json_value(value)
    return args


def module_spec(module: nn.Module) -> dict[str, Any]:
    """``{"type", "args"}`` of one module: args for table types, ``None`` for others."""
    name = _TYPE_NAMES.get(type(module))
    if name is None:
        return {"type": qualname(type(module)), "args": None}
    return {"type": name, "args": module_args(module, name)}


def inherited_args(current: nn.Module, type_name: str, has_bias: bool) -> dict[str, Any]:
    """What a partial record of table type ``type_name`` takes from the module ``current``
    at its path: the same-named attributes, except that ``bias`` follows the file
    (``has_bias``: whether it holds the tensor ``<path>.bias``)."""
    args = module_args(current, type_name)
    if "bias" in MODULE_TYPES[type_name][1]:
        args["bias"] = has_bias
    return args


def complete_args(path: str, type_name: str, partial: dict[str, Any], current: nn.Module,
                  has_bias: bool) -> dict[str, Any]:
    """Partial args of a module record completed from the module ``current`` at its path
    and the file (see :func:`inherited_args`); every value validated."""
    checks = MODULE_TYPES[type_name][1]
    inherited = inherited_args(current, type_name, has_bias)
    missing = [k for k in checks if k not in partial and k not in inherited]
    if missing:
        fail(f"module {short(path)}: its record omits {missing[0]!r}, which the "
             f"{type(current).__name__} there does not have")
    args = {**inherited, **partial}
    return {k: checks[k](args[k], f"module {short(path)} {k}") for k in checks}


def build_module(spec: Any, what: str) -> nn.Module:
    """A module of :data:`MODULE_TYPES` from ``{"type", "args"}`` (as :func:`module_spec`
    writes it), every arg validated; anything else raises FormatError naming ``what``."""
    entry = check_keys(spec, what, ("type", "args"))
    type_name = check_str(entry["type"], f"{what} type")
    if type_name not in MODULE_TYPES:
        fail(f"{what}: type {short(type_name)} cannot be constructed from a file (known: "
             f"{', '.join(MODULE_TYPES)})")
    cls, checks = MODULE_TYPES[type_name]
    args = check_keys(entry["args"], f"{what} args", checks)
    kwargs = {k: checks[k](args[k], f"{what} {k}") for k in checks}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def _owns_tensors(module: nn.Module) -> bool:
    return any(v is not None for v in (*module._parameters.values(), *module._buffers.values()))


def _recorded(module: nn.Module) -> bool:
    """Owns tensors, is a table type holding some (a wrapper such as LowRankRNN), or is an
    Identity (recorded so that a layer replaced by one stays replaced on load)."""
    if _owns_tensors(module) or type(module) is nn.Identity:
        return True
    return type(module) in _TYPE_NAMES and next(module.parameters(), None) is not None


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON architecture record of ``model`` (see the module docstring)."""
    cls = type(model)
    arch_name = getattr(cls, "arch_name", None)
    if isinstance(arch_name, str) and callable(getattr(model, "arch_config", None)):
        config = model.arch_config()
        try:
            config = json.loads(json.dumps(config, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{cls.__name__}.arch_config() is not JSON-serialisable: "
                              f"{exc}") from None
        if not isinstance(config, dict):
            raise FormatError(f"{cls.__name__}.arch_config() must return a dict, "
                              f"got {type(config).__name__}")
        builder: dict[str, Any] = {"name": arch_name, "config": config}
    else:
        builder = {"name": None, "class": qualname(cls)}
    modules = {path: module_spec(m) for path, m in model.named_modules(remove_duplicate=False)
               if _recorded(m)}
    return {"builder": builder, "modules": modules}


def parse_record(raw: Any) -> ArchRecord:
    """Validate a record read from a file (types, keys, and args of table types)."""
    record = check_keys(raw, "arch record", ("builder", "modules"))
    builder = check_dict(record["builder"], "arch builder")
    if builder.get("name") is None:
        check_keys(builder, "arch builder", ("name", "class"))
        name, config = None, None
        class_name = check_str(builder["class"], "arch builder class")
    else:
        check_keys(builder, "arch builder", ("name", "config"))
        name = check_str(builder["name"], "arch builder name")
        config = check_dict(builder["config"], f"arch config of {short(name)}")
        class_name = None
    modules, partial = {}, set()
    for path, spec in check_dict(record["modules"], "arch modules").items():
        what = f"module {short(path)}"
        entry = check_keys(spec, what, ("type", "args"), ("partial",))
        type_name = check_str(entry["type"], f"{what} type")
        if entry.get("partial", True) is not True:
            fail(f"{what} partial must be true when present, got {short(entry['partial'])}")
        if type_name in MODULE_TYPES:
            checks = MODULE_TYPES[type_name][1]
            if "partial" in entry:
                partial.add(path)
                args = check_keys(entry["args"], f"{what} args", (), checks)
            else:
                args = check_keys(entry["args"], f"{what} args", checks)
            modules[path] = (type_name, {k: checks[k](v, f"{what} {k}") for k, v in args.items()})
        elif entry["args"] is not None or "partial" in entry:
            fail(f"{what} records type {short(type_name)} with args, but only "
                 f"{', '.join(MODULE_TYPES)} can be constructed from a file")
        else:
            modules[path] = (type_name, None)
    if partial and name is None:
        fail(f"module {short(min(partial))} records partial args, which only a model with "
             "a builder can complete")
    return ArchRecord(name, config, class_name, modules, frozenset(partial))
