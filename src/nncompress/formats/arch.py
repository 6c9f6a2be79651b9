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
  Registered layer types (:data:`~nncompress.formats.layer_types.LAYER_TYPES`, read
  through :func:`~nncompress.formats.layer_types.layer_types`) record their constructor
  arguments; on load, a module whose built spec differs from the recorded one (e.g. a
  structurally pruned Linear with fewer ``out_features``, or a Linear recorded as the
  ``LowRankLinear`` that replaced it) is replaced by one constructed from the recorded,
  validated args, parents before children. Other types record ``"args": null`` and must
  match the built model's type exactly.

This module registers PyTorch's own layers; every other package registers its layer types
next to their classes (``nncompress.lowrank.layers``, ``nncompress.share.hashed_layers``,
``nncompress.modules.attention``, ...), and no module of ``nncompress.formats`` imports a
technique package. Nothing from a file is ever imported, evaluated or unpickled: only
registered layer types, ``builders`` or the architecture registry are ever called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncompress.errors import FormatError
from nncompress.formats._checks import (
    check_dict,
    check_keys,
    check_str,
    fail,
    short,
)
from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    Validator,
    bool_arg,
    choice_arg,
    float_arg,
    fraction_arg,
    int_arg,
    ints_arg,
    layer_types,
    names_arg,
    optional_arg,
    padding_arg,
    positive_arg,
    signed_arg,
)
from nncompress.registry import Registry

__all__ = ["ARCH_PROVIDERS", "ArchRecord", "build_module", "complete_args", "describe",
           "inherited_args", "module_args", "module_spec", "parse_record", "qualname",
           "same_class"]

_CONV = {"in_channels": int_arg, "out_channels": int_arg, "kernel_size": ints_arg,
         "stride": ints_arg, "padding": padding_arg, "dilation": ints_arg,
         "groups": positive_arg, "bias": bool_arg,
         "padding_mode": choice_arg("zeros", "reflect", "replicate", "circular")}
_NORM = {"num_features": int_arg, "eps": float_arg, "momentum": optional_arg(float_arg),
         "affine": bool_arg, "track_running_stats": bool_arg}
_RNN = {"input_size": int_arg, "hidden_size": int_arg, "num_layers": positive_arg,
        "bias": bool_arg, "batch_first": bool_arg, "dropout": fraction_arg,
        "bidirectional": bool_arg}

#: PyTorch's own layers a file may construct (the key order of each args dict is the
#: order of a compact record's args list: never reorder). Other packages register their
#: layer types next to their classes (see :data:`~nncompress.formats.layer_types.LAYER_PACKAGES`).
_TORCH_LAYERS: tuple[tuple[str, type[nn.Module], dict[str, Validator]], ...] = (
    ("Linear", nn.Linear, {"in_features": int_arg, "out_features": int_arg,
                           "bias": bool_arg}),
    ("Conv1d", nn.Conv1d, _CONV),
    ("Conv2d", nn.Conv2d, _CONV),
    ("BatchNorm1d", nn.BatchNorm1d, _NORM),
    ("BatchNorm2d", nn.BatchNorm2d, _NORM),
    ("LayerNorm", nn.LayerNorm, {"normalized_shape": ints_arg, "eps": float_arg,
                                 "elementwise_affine": bool_arg, "bias": bool_arg}),
    ("GroupNorm", nn.GroupNorm, {"num_groups": positive_arg, "num_channels": int_arg,
                                 "eps": float_arg, "affine": bool_arg}),
    ("InstanceNorm1d", nn.InstanceNorm1d, _NORM),
    ("InstanceNorm2d", nn.InstanceNorm2d, _NORM),
    ("RMSNorm", nn.RMSNorm, {"normalized_shape": ints_arg, "eps": optional_arg(float_arg),
                             "elementwise_affine": bool_arg}),
    ("Embedding", nn.Embedding, {"num_embeddings": int_arg, "embedding_dim": int_arg,
                                 "padding_idx": optional_arg(int_arg),
                                 "max_norm": optional_arg(float_arg), "norm_type": float_arg,
                                 "scale_grad_by_freq": bool_arg, "sparse": bool_arg}),
    # a layer removed by surgery (e.g. a BatchNorm folded into its convolution)
    ("Identity", nn.Identity, {}),
    ("GRU", nn.GRU, _RNN),
    ("LSTM", nn.LSTM, {**_RNN, "proj_size": int_arg}),
    ("RNN", nn.RNN, {**_RNN, "nonlinearity": choice_arg("tanh", "relu")}),
    # containers: a recorded child list lets a model whose layers were removed (layer
    # pruning) load into a skeleton that still has them (the extra children are dropped)
    ("ModuleList", nn.ModuleList, {"children": names_arg}),
    ("Sequential", nn.Sequential, {"children": names_arg}),
    # parameter-free operations, for builders that record their own structure (they own no
    # tensors, so files never record them in "modules")
    ("ReLU", nn.ReLU, {}),
    ("Tanh", nn.Tanh, {}),
    ("Sigmoid", nn.Sigmoid, {}),
    ("GELU", nn.GELU, {"approximate": choice_arg("none", "tanh")}),
    ("LeakyReLU", nn.LeakyReLU, {"negative_slope": float_arg}),
    ("Flatten", nn.Flatten, {"start_dim": signed_arg, "end_dim": signed_arg}),
    ("Dropout", nn.Dropout, {"p": fraction_arg}),
    ("AdaptiveAvgPool1d", nn.AdaptiveAvgPool1d, {"output_size": positive_arg}),
    ("MaxPool1d", nn.MaxPool1d, {"kernel_size": positive_arg, "stride": positive_arg,
                                 "padding": int_arg}),
    ("AvgPool1d", nn.AvgPool1d, {"kernel_size": ints_arg, "stride": ints_arg,
                                 "padding": ints_arg}),
)


def _register_torch_layers() -> None:
    for name, cls, args in _TORCH_LAYERS:
        LAYER_TYPES.register(name, LayerType(cls, dict(args)))


_register_torch_layers()

#: modules that register architectures outside ``nncompress.models`` (imported on demand)
ARCH_PROVIDERS = ("nncompress.share.zipped", "nncompress.share.composite", "nncompress.quant.int8")


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
    """The constructor args of layer type ``type_name`` as ``module`` has them: each from
    the attribute of the same name (``bias``: whether it has one); absent ones left out."""
    return _args_of(module, type_name, layer_types().get(type_name))


def _args_of(module: nn.Module, type_name: str, entry: LayerType) -> dict[str, Any]:
    if type_name in CONTAINERS:
        return {"children": list(module._modules)}
    args = {}
    for key in entry.args:
        if not hasattr(module, key):
            continue
        value = getattr(module, key)
        if key == "bias" and not isinstance(value, bool):
            value = value is not None
        args[key] = _json_value(value)
    return args


ByClass = dict[type, tuple[str, LayerType]]


def _by_class(table: Registry[LayerType]) -> ByClass:
    """Class -> (registered name, entry) of every layer type (exact classes only)."""
    return {(entry := table.get(name)).cls: (name, entry) for name in table.names()}


def module_spec(module: nn.Module, types: ByClass | None = None) -> dict[str, Any]:
    """``{"type", "args"}`` of one module: args for registered layer types, ``None`` for
    others (``types``: :func:`_by_class` of the registry, when the caller has it)."""
    found = (types if types is not None else _by_class(layer_types())).get(type(module))
    if found is None:
        return {"type": qualname(type(module)), "args": None}
    return {"type": found[0], "args": _args_of(module, *found)}


def inherited_args(current: nn.Module, type_name: str, has_bias: bool) -> dict[str, Any]:
    """What a partial record of table type ``type_name`` takes from the module ``current``
    at its path: the same-named attributes, except that ``bias`` follows the file
    (``has_bias``: whether it holds the tensor ``<path>.bias``)."""
    args = module_args(current, type_name)
    if "bias" in layer_types().get(type_name).args:
        args["bias"] = has_bias
    return args


def complete_args(path: str, type_name: str, partial: dict[str, Any], current: nn.Module,
                  has_bias: bool) -> dict[str, Any]:
    """Partial args of a module record completed from the module ``current`` at its path
    and the file (see :func:`inherited_args`); every value validated."""
    checks = layer_types().get(type_name).args
    inherited = inherited_args(current, type_name, has_bias)
    missing = [k for k in checks if k not in partial and k not in inherited]
    if missing:
        fail(f"module {short(path)}: its record omits {missing[0]!r}, which the "
             f"{type(current).__name__} there does not have")
    args = {**inherited, **partial}
    return {k: checks[k](args[k], f"module {short(path)} {k}") for k in checks}


def build_module(spec: Any, what: str) -> nn.Module:
    """A module of a registered layer type (:func:`~nncompress.formats.layer_types.layer_types`)
    from ``{"type", "args"}`` (as :func:`module_spec` writes it), every arg validated;
    anything else raises FormatError naming ``what``."""
    entry = check_keys(spec, what, ("type", "args"))
    type_name = check_str(entry["type"], f"{what} type")
    table = layer_types()
    if type_name not in table:
        fail(f"{what}: type {short(type_name)} cannot be constructed from a file (known: "
             f"{', '.join(table.names())})")
    cls, checks = table.get(type_name).cls, table.get(type_name).args
    args = check_keys(entry["args"], f"{what} args", checks)
    kwargs = {k: checks[k](args[k], f"{what} {k}") for k in checks}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def _owns_tensors(module: nn.Module) -> bool:
    return any(v is not None for v in (*module._parameters.values(), *module._buffers.values()))


def _recorded(module: nn.Module, types: ByClass) -> bool:
    """Owns tensors, is a layer type holding some (a wrapper such as LowRankRNN), or is an
    Identity (recorded so that a layer replaced by one stays replaced on load)."""
    if _owns_tensors(module) or type(module) is nn.Identity:
        return True
    return type(module) in types and next(module.parameters(), None) is not None


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
    types = _by_class(layer_types())
    modules = {path: module_spec(m, types)
               for path, m in model.named_modules(remove_duplicate=False) if _recorded(m, types)}
    return {"builder": builder, "modules": modules}


def parse_record(raw: Any) -> ArchRecord:
    """Validate a record read from a file (types, keys, and args of layer types)."""
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
    modules, partial, table = {}, set(), layer_types()
    for path, spec in check_dict(record["modules"], "arch modules").items():
        what = f"module {short(path)}"
        entry = check_keys(spec, what, ("type", "args"), ("partial",))
        type_name = check_str(entry["type"], f"{what} type")
        if entry.get("partial", True) is not True:
            fail(f"{what} partial must be true when present, got {short(entry['partial'])}")
        if type_name in table:
            checks = table.get(type_name).args
            if "partial" in entry:
                partial.add(path)
                args = check_keys(entry["args"], f"{what} args", (), checks)
            else:
                args = check_keys(entry["args"], f"{what} args", checks)
            modules[path] = (type_name, {k: checks[k](v, f"{what} {k}") for k, v in args.items()})
        elif entry["args"] is not None or "partial" in entry:
            fail(f"{what} records type {short(type_name)} with args, but only "
                 f"{', '.join(table.names())} can be constructed from a file")
        else:
            modules[path] = (type_name, None)
    if partial and name is None:
        fail(f"module {short(min(partial))} records partial args, which only a model with "
             "a builder can complete")
    return ArchRecord(name, config, class_name, modules, frozenset(partial))
