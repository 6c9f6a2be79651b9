"""Models made of several models, saved and loaded as one ``.nnc`` file.

The multi-model methods of :mod:`nncompress.share.methods` return one of these (or a
:class:`~nncompress.share.zipped.ZippedPair`), so that each result is a single packed
file that ``nc.load`` rebuilds without pickle:

- :class:`CascadeModel` (architecture ``"cascade"``): a confidence cascade
  (Eshratifar & Pedram 2020, :class:`~nncompress.share.multiplex.Cascade`);
- :class:`MultiplexerModel` (``"multiplexer"``): models behind a learned router
  (Eshratifar & Pedram 2020, :class:`~nncompress.share.router.Multiplexer`);
- :class:`BranchesModel` (``"multi_branch"``): one frozen backbone with a head per task
  (the multi-branch networks of the survey's multiplexing section, e.g. Zhang, Ye & Luo
  2019; :class:`~nncompress.share.branches.MultiBranch`).

Each member model is recorded by its builder, ``{"name": arch_name, "config": {...}}``
(so only reference architectures, :class:`~nncompress.models.base.ArchModule` s, can be
members; a structurally pruned or factorised member records its changed layers in the
file's module records as a single model does). Routers and heads are recorded as
``{"type", "args"}`` specs of :data:`nncompress.formats.LAYER_TYPES`. Everything read
back is validated; only registered classes are ever constructed.

Import this module before ``nc.load`` of such a file (the command line does) so that the
architectures are registered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from nncompress.errors import ModelError
from nncompress.formats._checks import (
    check_dict,
    check_float,
    check_keys,
    check_list,
    check_str,
    fail,
)
from nncompress.models.base import ARCHITECTURES, ArchModule
from nncompress.share import zipped  # noqa: F401  (registers "zipped_pair" for members)
from nncompress.share.branches import MultiBranch
from nncompress.share.multiplex import Cascade
from nncompress.share.router import Multiplexer
from nncompress.share.zipped import Spec, spec_of

__all__ = ["COMPOSITES", "BranchesModel", "CascadeModel", "MultiplexerModel",
           "check_member", "output_layer"]

#: members of a composite; more is a hostile file
_MAX_MEMBERS = 64


def check_member(model: nn.Module, what: str) -> dict[str, Any]:
    """``{"name", "config"}`` of a model that can be a member; else ModelError naming
    ``what`` (a user model has no builder, and composites do not nest)."""
    name = getattr(type(model), "arch_name", None)
    if not (isinstance(model, ArchModule) and isinstance(name, str)):
        raise ModelError(
            f"{what} is a user model (class {type(model).__qualname__}); one .nnc file "
            "rebuilds only models of the reference architectures (nncompress models) and "
            "their compressed versions")
    if name in COMPOSITES:
        raise ModelError(f"{what} is itself a {name!r}; composites do not nest")
    return {"name": name, "config": json.loads(json.dumps(model.arch_config()))}


def _build_member(record: Any, what: str) -> nn.Module:
    """A member from its recorded builder (validated; registered classes only)."""
    entry = check_keys(record, what, ("name", "config"))
    name = check_str(entry["name"], f"{what} name")
    if name in COMPOSITES:
        fail(f"{what} is a {name!r}; composites do not nest")
    if name not in ARCHITECTURES:
        fail(f"{what}: unknown architecture {name!r}")
    check_dict(entry["config"], f"{what} config")
    return ARCHITECTURES.get(name)(**entry["config"])


def _members(models: Sequence[nn.Module | dict[str, Any]], what: str) -> list[nn.Module]:
    items = check_list(list(models), f"{what} models", max_len=_MAX_MEMBERS)
    return [m if isinstance(m, nn.Module) else _build_member(m, f"{what} model {i}")
            for i, m in enumerate(items)]


def _sequential(parts: nn.Module | Sequence[Spec], what: str) -> nn.Sequential:
    """A router or head: a module as given, or rebuilt from its specs."""
    from nncompress.formats.arch import build_module

    if isinstance(parts, nn.Sequential):
        return parts
    if isinstance(parts, nn.Module):
        return nn.Sequential(parts)
    specs = check_list(parts, what, max_len=_MAX_MEMBERS)
    return nn.Sequential(*(build_module(s, f"{what}[{i}]") for i, s in enumerate(specs)))


def _threshold(value: Any, what: str) -> float:
    number = check_float(value, what)
    if not (math.isfinite(number) and 0.0 <= number <= 2.0):
        fail(f"{what} must be a number from 0 to 2, got {number}")
    return number


class CascadeModel(Cascade, ArchModule):
    """A :class:`~nncompress.share.multiplex.Cascade` that saves as one ``.nnc`` file
    (architecture ``"cascade"``); members may be given as modules or recorded builders."""

    arch_name = "cascade"

    def __init__(self, models: Sequence[nn.Module | dict[str, Any]],
                 thresholds: Sequence[float]) -> None:
        members = _members(models, "cascade")
        levels = [_threshold(t, f"cascade threshold {i}") for i, t in
                  enumerate(check_list(list(thresholds), "cascade thresholds",
                                       max_len=_MAX_MEMBERS))]
        super().__init__(members, levels)

    def arch_config(self) -> dict[str, Any]:
        return {"models": [check_member(m, f"cascade model {i}")
                           for i, m in enumerate(self.models)],
                "thresholds": list(self.thresholds)}


class MultiplexerModel(Multiplexer, ArchModule):
    """A :class:`~nncompress.share.router.Multiplexer` that saves as one ``.nnc`` file
    (architecture ``"multiplexer"``); the router is a sequence of recordable layers."""

    arch_name = "multiplexer"

    def __init__(self, models: Sequence[nn.Module | dict[str, Any]],
                 router: nn.Module | Sequence[Spec], threshold: float) -> None:
        super().__init__(_members(models, "multiplexer"),
                         _sequential(router, "multiplexer router"),
                         _threshold(threshold, "multiplexer threshold"))

    def arch_config(self) -> dict[str, Any]:
        return {"models": [check_member(m, f"multiplexer model {i}")
                           for i, m in enumerate(self.models)],
                "router": [spec_of(m) for m in self.router],
                "threshold": self.threshold}


def output_layer(model: nn.Module) -> str:
    """Path of ``model``'s last ``nn.Linear`` (in registration order): the classifier a
    backbone is cut at. ModelError if it has none."""
    paths = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not paths:
        raise ModelError(f"{type(model).__name__} has no Linear output layer to replace "
                         "by task heads")
    return paths[-1]


def _cut(model: nn.Module, path: str, what: str) -> None:
    """Replace the Linear at ``path`` by an Identity (the backbone then returns features)."""
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, leaf)
    except AttributeError:
        fail(f"{what}: the backbone has no module {path!r}")
    if not isinstance(layer, nn.Linear):
        fail(f"{what}: {path!r} is a {type(layer).__name__}, not the backbone's Linear "
             "output layer")
    setattr(parent, leaf, nn.Identity())


class BranchesModel(MultiBranch, ArchModule):
    """A :class:`~nncompress.share.branches.MultiBranch` that saves as one ``.nnc`` file
    (architecture ``"multi_branch"``).

    ``backbone`` is a classifier (a module, or its recorded builder) whose Linear output
    layer at ``cut`` is replaced by an Identity -- in place, for a module -- so that it
    returns that layer's input features ``[B, F]``; each head maps ``[B, F]`` to one task's
    logits. The backbone's builder is recorded as it was before the cut.
    """

    arch_name = "multi_branch"

    def __init__(self, backbone: nn.Module | dict[str, Any], cut: str,
                 heads: Sequence[nn.Module | Sequence[Spec]]) -> None:
        if isinstance(backbone, nn.Module):
            record = check_member(backbone, "the backbone")
        else:
            record = check_keys(backbone, "multi_branch backbone", ("name", "config"))
            backbone = _build_member(record, "multi_branch backbone")
        cut = check_str(cut, "multi_branch cut")
        _cut(backbone, cut, "multi_branch")
        items = check_list(list(heads), "multi_branch heads", max_len=_MAX_MEMBERS)
        super().__init__(backbone, [_sequential(h, f"multi_branch head {i}")
                                    for i, h in enumerate(items)])
        self.backbone_record = record
        self.cut = cut

    def arch_config(self) -> dict[str, Any]:
        return {"backbone": self.backbone_record, "cut": self.cut,
                "heads": [[spec_of(m) for m in head] for head in self.heads]}


#: arch names of the composites (members may not be composites themselves)
COMPOSITES: frozenset[str] = frozenset(("cascade", "multiplexer", "multi_branch"))
for _cls in (CascadeModel, MultiplexerModel, BranchesModel):
    ARCHITECTURES.register(_cls.arch_name, _cls)
