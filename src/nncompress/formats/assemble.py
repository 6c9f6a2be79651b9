"""Building the model a ``.nnc`` file describes (``load``), and what ``save`` records of it.

Loading a builder-recorded model: the builder runs on the meta device under a
:class:`~nncompress.formats.limits.CallGuard`, recorded modules replace the built ones
(each probed on the meta device first), and every tensor is checked by name and shape --
all before any memory is allocated. When nothing of the meta model lies outside its
``state_dict`` (no non-persistent buffers, no shared parameters) the decoded tensors are
assigned to it directly (no initialisation, no copy); otherwise its bytes are charged to
the load's :class:`~nncompress.formats.limits.Budget` and the model is built for real.

``save`` records only the modules that differ from the builder's own construction
(:func:`recorded_modules`): a reference model rebuilds from its config alone, and a
structurally pruned or factorised one records just its changed layers.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from nncompress.errors import FormatError
from nncompress.formats._checks import clip, fail, short
from nncompress.formats.arch import (
    ARCH_PROVIDERS,
    CONTAINERS,
    ArchRecord,
    complete_args,
    describe,
    inherited_args,
    module_spec,
    qualname,
    same_class,
)
from nncompress.formats.layer_types import layer_types
from nncompress.formats.limits import (
    Budget,
    CallGuard,
    TooMuchWork,
    call_limit,
    meta_tensors,
    module_bytes,
)

__all__ = ["build", "recorded_modules"]

Builders = Mapping[str, Callable[..., nn.Module]]
Modules = Mapping[str, tuple[str, dict[str, Any] | None]]
#: Integers in a builder config may not exceed this or the file's element count.
CONFIG_INT_FLOOR = 1 << 24
#: Recurrent types: (bias tensors per layer and direction, projection weight or not).
_RNN_TYPES = {"GRU", "LSTM", "RNN"}


def _guarded(call: Callable[[], Any], *, limit: int, what: str) -> Any:
    """``call()`` on the meta device, RNG untouched, stopped past ``limit`` torch calls;
    any failure is a FormatError naming ``what``."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), CallGuard(limit):
            return call()
    except FormatError as exc:  # e.g. a builder validating specs from its config
        fail(f"{what}: {clip(str(exc), 240)}")
    except TooMuchWork:
        fail(f"{what} takes more than {limit} torch calls to build; the file is hostile "
             "or corrupted")
    except Exception as exc:  # a hostile record may provoke anything from a constructor
        fail(f"{what}: {clip(f'{type(exc).__name__}: {exc}', 160)}")


def _factory(name: str, builders: Builders | None) -> Callable[..., nn.Module]:
    if builders is not None and name in builders:
        return builders[name]
    try:
        from nncompress.models import ARCHITECTURES
    except ImportError:
        known: tuple[str, ...] = ()
    else:
        for provider in ARCH_PROVIDERS:  # modules whose import registers architectures
            if name in ARCHITECTURES:
                break
            importlib.import_module(provider)
        if name in ARCHITECTURES:
            return ARCHITECTURES.get(name)
        known = ARCHITECTURES.names()
    known += tuple(builders or ())
    fail(f"file needs architecture {name!r}, which is not registered (known: "
         f"{', '.join(sorted(known)) or 'none'}); pass builders={{{name!r}: YourClass}}")


def _check_config(value: Any, limit: int, what: str) -> None:
    """Every integer in a builder config is at most ``limit`` (a count of 10**9 layers
    would make a builder fill memory before building anything)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > limit:
            fail(f"{what} holds the integer {item}, more than {limit:,} (the larger of "
                 f"{CONFIG_INT_FLOOR:,} and the file's element count)")


def _meta_builder_model(record: ArchRecord, builders: Builders | None,
                        tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """``cls(**config)`` on the meta device, after bounding the config's integers."""
    assert record.name is not None and record.config is not None
    factory = _factory(record.name, builders)
    held = sum(t.numel() for t in tensors.values())
    what = f"architecture {record.name!r}"
    _check_config(record.config, max(CONFIG_INT_FLOOR, held), f"arch config of {what}")
    model = _guarded(lambda: factory(**record.config), limit=call_limit(len(tensors)),
                     what=f"cannot build {what} from its recorded config")
    if not isinstance(model, nn.Module):
        fail(f"builder of {record.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _under(path: str, tensors: Mapping[str, torch.Tensor], *, direct: bool) -> list[str]:
    prefix = f"{path}." if path else ""
    names = [n for n in tensors if n.startswith(prefix)]
    return [n for n in names if "." not in n[len(prefix):]] if direct else names


def _check_rnn(path: str, type_name: str, args: dict[str, Any],
               tensors: Mapping[str, torch.Tensor]) -> None:
    """A recurrent module's tensor count follows from its args: refuse a mismatch before
    constructing anything (a recorded ``num_layers`` of 20,000 builds nothing)."""
    if type_name not in _RNN_TYPES:
        return
    per = 2 + 2 * bool(args["bias"]) + (type_name == "LSTM" and args.get("proj_size", 0) > 0)
    need = args["num_layers"] * (1 + bool(args["bidirectional"])) * per
    held = len(_under(path, tensors, direct=True))
    if need != held:
        fail(f"module {short(path)} records a {type_name} of {need} tensors (num_layers="
             f"{args['num_layers']}) but the file holds {held} under it")


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own parameters and persistent buffers (its children are recorded and
    checked on their own: a rewritten encoder layer is built as it was before pruning
    changed its children)."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False)]
    skip = module._non_persistent_buffers_set
    return own + [(n, b) for n, b in module.named_buffers(recurse=False) if n not in skip]


def _probe(path: str, type_name: str, args: dict[str, Any],
           tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The recorded module on the meta device, its tensor shapes checked against the file."""
    _check_rnn(path, type_name, args, tensors)
    cls = layer_types().get(type_name).cls
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    limit = call_limit(len(_under(path, tensors, direct=False)))
    probe = _guarded(lambda: cls(**kwargs), limit=limit,
                     what=f"module {short(path)}: cannot construct {type_name} from its "
                          "recorded args")
    for leaf, tensor in _own_tensors(probe):
        name = f"{path}.{leaf}" if path else leaf
        if name not in tensors:
            fail(f"module {short(path)} rebuilt as {type_name} needs tensor {short(name)}, "
                 "which the file lacks")
        if tensor.shape != tensors[name].shape:
            fail(f"tensor {short(name)} has shape {list(tensors[name].shape)} in the file but "
                 f"{list(tensor.shape)} in the {type_name} its module records")
    return probe


def _swap(model: nn.Module, found: dict[str, nn.Module], path: str, new: nn.Module
          ) -> nn.Module:
    """Put ``new`` at ``path``; the old subtree is forgotten and the new one's children
    (recorded after their parent, e.g. ``fc.first``) are found under ``path``."""
    if not path:
        model = new
    else:
        parent, _, leaf = path.rpartition(".")
        setattr(found[parent], leaf, new)
    for stale in [p for p in found if p.startswith(f"{path}.") or (not path and p)]:
        del found[stale]
    found.update(new.named_modules(prefix=path, remove_duplicate=False))
    return model


def _replace(model: nn.Module, modules: Modules,
             make: Callable[[str, str, dict[str, Any]], nn.Module],
             partial: frozenset[str] = frozenset(),
             held: Collection[str] = ()) -> nn.Module:
    """Apply the module records to ``model`` in order (parents first); ``make`` builds a
    table module that differs from the one in place. Records at ``partial`` paths take
    the args they omit from the module in place (``bias`` from the names ``held``)."""
    found = dict(model.named_modules(remove_duplicate=False))
    for path, (type_name, args) in modules.items():
        current = found.get(path)
        if current is None:
            fail(f"module {short(path)} recorded in the file is not in the model")
        if args is None:
            if not same_class(type_name, type(current)):
                fail(f"module {short(path)} is recorded as {short(type_name, 160)} but the model "
                     f"has {qualname(type(current))}")
            continue
        if type_name in CONTAINERS:
            model = _trim(model, found, path, type_name, args["children"])
            continue
        if path in partial:
            has_bias = f"{path}.bias" in held if path else "bias" in held
            args = complete_args(path, type_name, args, current, has_bias)
        if module_spec(current) != {"type": type_name, "args": args}:
            model = _swap(model, found, path, make(path, type_name, args))
    return model


def _trim(model: nn.Module, found: dict[str, nn.Module], path: str, type_name: str,
          children: list[str]) -> nn.Module:
    """A recorded ModuleList / Sequential keeps only its recorded children (a model whose
    layers were removed loads into a skeleton that still has them); a recorded child the
    container lacks, or a container of another type, is refused."""
    current = found[path]
    if type(current) is not layer_types().get(type_name).cls:
        fail(f"module {short(path)} is recorded as a {type_name} but the model has "
             f"{qualname(type(current))}")
    have = list(current._modules)
    if have == children:
        return model
    missing = [c for c in children if c not in current._modules]
    if missing:
        fail(f"module {short(path)} records child {short(missing[0])}, which the model's "
             f"{type_name} lacks (it has {len(have)})")
    if type_name == "ModuleList" and children != [str(i) for i in range(len(children))]:
        fail(f"module {short(path)}: a ModuleList's children must be 0..n-1")
    new = copy.copy(current)
    new._modules = OrderedDict((c, current._modules[c]) for c in children)
    return _swap(model, found, path, new)


def _fit(model: nn.Module, tensors: Mapping[str, torch.Tensor],
         budget: Budget | None = None, *, placeholders: bool = False) -> None:
    """Check names strictly; give non-table tensors the file's shape and any dtype it has
    (charging ``budget`` for the new ones; ``placeholders``: on the meta device, for
    tensors the file's will replace)."""
    own = model.state_dict(keep_vars=True)
    for name in own:
        if name not in tensors:
            fail(f"tensor {short(name)} of the model is missing from the file")
    owners = dict(model.named_modules(remove_duplicate=False))
    types = layer_types()
    table = {types.get(name).cls for name in types.names()}
    for name, value in tensors.items():
        current = own.get(name)
        if not isinstance(current, torch.Tensor):
            fail(f"file holds tensor {short(name)} that the model does not have")
        if current.shape == value.shape and current.dtype == value.dtype:
            continue
        path, _, leaf = name.rpartition(".")
        owner = owners[path]
        if type(owner) in table and current.shape != value.shape:
            fail(f"tensor {short(name)} has shape {list(value.shape)} in the file but "
                 f"{list(current.shape)} in the model")
        device = "meta" if placeholders else current.device
        if budget is not None and device != "meta" and not current.is_meta:
            budget.spend(value.numel() * value.element_size(), f"tensor {short(name)}")
        fresh = torch.empty(value.shape, dtype=value.dtype, device=device)
        if leaf in owner._parameters:
            grad = current.requires_grad and (value.is_floating_point() or value.is_complex())
            setattr(owner, leaf, nn.Parameter(fresh, requires_grad=grad))
        elif leaf in owner._buffers:
            setattr(owner, leaf, fresh)
        else:
            fail(f"tensor {short(name)} is neither a parameter nor a buffer of the model")


def _assignable(model: nn.Module) -> bool:
    """Every tensor of ``model`` is its own ``state_dict`` entry (no non-persistent
    buffers, no parameter under two names), so assigning the file's tensors completes it."""
    names, seen = set(model.state_dict()), set()
    for name, tensor in (*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)):
        if name not in names or id(tensor) in seen:
            return False
        seen.add(id(tensor))
    return True


def _load(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, *,
          assign: bool = False) -> nn.Module:
    try:
        with torch.no_grad():
            model.load_state_dict(dict(tensors), strict=True, assign=assign)
    except RuntimeError as exc:
        fail(f"cannot load the tensors of {source}: {clip(str(exc), 200)}")
    return model


def build(record: ArchRecord, shapes: Mapping[str, torch.Tensor],
          decode: Callable[[], dict[str, torch.Tensor]], *, skeleton: nn.Module | None,
          builders: Builders | None, budget: Budget, source: str) -> nn.Module:
    """The recorded model (or ``skeleton``, modified in place) holding the decoded tensors.

    ``shapes``: a meta tensor per file tensor (its shape and dtype); ``decode()`` gives the
    tensors, called once everything else has been checked.
    """
    if skeleton is not None:
        return _into_skeleton(record, shapes, decode, skeleton, builders, budget, source)
    if record.name is None:
        fail(f"{source} holds a user model of class {str(record.class_name)[:160]}; pass "
             "skeleton= (a freshly constructed instance) or give the class "
             "arch_name/arch_config and pass builders=")
    meta = _meta_builder_model(record, builders, shapes)
    cost = module_bytes(meta)
    added: list[nn.Module] = []

    def probe(path: str, type_name: str, args: dict[str, Any]) -> nn.Module:
        added.append(_probe(path, type_name, args, shapes))
        return added[-1]

    meta = _replace(meta, record.modules, probe, record.partial, shapes)
    _fit(meta, shapes)
    tensors = decode()
    if _assignable(meta):
        model = _load(meta, tensors, source, assign=True)
        if not meta_tensors(model):
            return model
    budget.spend(cost + sum(module_bytes(m) for m in added),
                 "the model's parameters and buffers")
    factory = _factory(str(record.name), builders)
    with torch.random.fork_rng(devices=[]):
        model = factory(**(record.config or {}))
        model = _replace(model, record.modules, lambda path, type_name, args:
                         _construct(type_name, args), record.partial,
                         shapes)
    _fit(model, tensors)
    return _load(model, tensors, source)


def _kwargs(args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def _construct(type_name: str, args: dict[str, Any]) -> nn.Module:
    """A registered layer type built from validated args."""
    return layer_types().get(type_name).cls(**_kwargs(args))


def _into_skeleton(record: ArchRecord, shapes: Mapping[str, torch.Tensor],
                   decode: Callable[[], dict[str, torch.Tensor]], skeleton: nn.Module,
                   builders: Builders | None, budget: Budget, source: str) -> nn.Module:
    """Apply the (expanded) module records to ``skeleton`` and load the tensors into it."""

    def make(path: str, type_name: str, args: dict[str, Any]) -> nn.Module:
        budget.spend(module_bytes(_probe(path, type_name, args, shapes)),
                     f"module {short(path)}")
        with torch.random.fork_rng(devices=[]):
            return _construct(type_name, args)

    modules, partial = _expanded(record, builders, shapes)
    model = _replace(skeleton, modules, make, partial, shapes)
    adopt = _adoptable(model)
    _fit(model, shapes, budget, placeholders=adopt)
    return _load(model, decode(), source, assign=adopt)


def _adoptable(model: nn.Module) -> bool:
    """Whether the file's tensors may simply replace ``model``'s (CPU tensors, none shared
    under two names) instead of being copied into them."""
    seen = set()
    for _, tensor in (*model.named_parameters(remove_duplicate=False),
                      *model.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen or tensor.device.type != "cpu":
            return False
        seen.add(id(tensor))
    return True


def _expanded(record: ArchRecord, builders: Builders | None,
              shapes: Mapping[str, torch.Tensor]) -> tuple[Modules, frozenset[str]]:
    """Every module record, complete: a file of format version 2 records only what
    differs from its builder's own model, so a skeleton gets the rest from that model
    (when the builder is known; else the records as they are, partial ones completed from
    the skeleton's modules)."""
    if record.name is None:
        return record.modules, record.partial
    try:
        meta = _meta_builder_model(record, builders, shapes)
        meta = _replace(meta, record.modules, lambda path, type_name, args: _probe(
            path, type_name, args, shapes), record.partial, shapes)
    except FormatError:
        return record.modules, record.partial
    full = describe(meta)["modules"]
    return {path: (spec["type"], spec["args"]) for path, spec in full.items()}, frozenset()


def recorded_modules(model: nn.Module, record: Mapping[str, Any]) -> dict[str, Any]:
    """The module records ``save`` writes: those of ``record`` (:func:`describe`) that
    differ from what the model's builder constructs from its config (all of them for a
    model without a builder, or when the builder cannot run on the meta device)."""
    modules = record["modules"]
    builder = record["builder"]
    if builder.get("name") is None:
        return dict(modules)
    try:
        reference = _guarded(lambda: type(model)(**builder["config"]),
                             limit=call_limit(len(model.state_dict())), what="reference")
    except FormatError:
        return dict(modules)
    found = dict(reference.named_modules(remove_duplicate=False))
    held = set(model.state_dict())
    differing = {}
    for path, spec in modules.items():
        current = found.get(path)
        same = current is not None and (module_spec(current) == spec if spec["args"] is not None
                                        else same_class(spec["type"], type(current)))
        if same:
            continue
        differing[path] = spec
        if current is not None and spec["args"] is not None:
            has_bias = f"{path}.bias" in held if path else "bias" in held
            differing[path] = _partial(spec, current, has_bias)
            cls = layer_types().get(spec["type"]).cls
            new = _guarded(lambda cls=cls, spec=spec: cls(**_kwargs(spec["args"])),
                           limit=call_limit(0), what=f"module {short(path)}")
            reference = _swap(reference, found, path, new)
    return differing


def _partial(spec: dict[str, Any], current: nn.Module, has_bias: bool) -> dict[str, Any]:
    """``spec`` with only the args ``load`` cannot take from the module ``current`` the
    builder put at its path and from the file (``has_bias``; see ``inherited_args``)."""
    inherited = inherited_args(current, spec["type"], has_bias)
    args = {k: v for k, v in spec["args"].items() if k not in inherited or inherited[k] != v}
    return {"type": spec["type"], "args": args, "partial": True}
