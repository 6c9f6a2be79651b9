"""``layer_prune``: remove whole layers or blocks, those whose removal hurts the training
loss least, then fine-tune.

Chen & Zhao (2018), "Shallowing deep networks: layer-wise pruning based on feature
representations", and the survey's layer-pruning section: a deep net has redundant
layers; drop the least useful ones and retrain the shallower net. Here "least useful" is
measured directly: the increase of the cross-entropy on a few training batches when the
layer is removed (replaced by the identity), re-measured after every removal (greedy).

Candidates (analysis, :func:`removable_layers`) are the elements of an ``nn.Sequential`` /
``nn.ModuleList`` that hold a weight matrix and whose removal (1) leaves the model's output
shape unchanged on a real batch, and (2) for a reference model, leaves an architecture its
``arch_config()`` rebuilds exactly (same tensor names and shapes), so the pruned model
round-trips through ``nc.save`` / ``nc.load``. That covers residual blocks (``rescnn``
``blocks.i``, ``transformer`` ``blocks.i``) and stacked RNN layers with equal input and
output widths (``layers.i``); a plain MLP/CNN layer qualifies only where its container's
numbering survives (a named ``fc2`` does not: the rebuilt MLP would call its successor
``fc2``), and each non-removable element is reported by name.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from nncompress import inputs
from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.measure.quality import soft_labels
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig
from nncompress.train import reseed_loader

__all__ = [
    "LayerPruneConfig",
    "layer_prune",
    "layer_scores",
    "removable_layers",
    "remove_layer",
]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
Batch = tuple[torch.Tensor, torch.Tensor]


class LayerPruneConfig(TechniqueConfig):
    """Parameters of ``layer_prune``; set exactly one of ``count``, ``params_reduction``,
    ``macs_reduction``.

    - ``count``: remove this many layers.
    - ``params_reduction`` / ``macs_reduction``: remove layers until the model has at most
      ``1 / x`` of its parameters / per-sample MACs.
    - ``batches``: training batches the loss increase is measured on.
    - ``layers`` / ``exclude``: fnmatch patterns over candidate names (e.g. ``blocks.*``).
    - ``epochs`` / ``lr``: fine-tuning after the removals (0 epochs: none).
    """

    count: int | None = Field(default=None, ge=1)
    params_reduction: float | None = Field(default=None, gt=1.0, le=1000.0)
    macs_reduction: float | None = Field(default=None, gt=1.0, le=1000.0)
    batches: int = Field(default=4, ge=1, le=1000)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    epochs: int = Field(default=1, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_target(self) -> LayerPruneConfig:
        given = [k for k in ("count", "params_reduction", "macs_reduction")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of count, params_reduction, macs_reduction; "
                             f"got {', '.join(given) or 'none'}")
        return self


def _without(container: nn.Module, leaf: str) -> nn.Module:
    """A shallow copy of ``container`` minus child ``leaf`` (renumbered if numbered)."""
    items = [(k, m) for k, m in container._modules.items() if k != leaf]
    if all(k.isdigit() for k in container._modules):
        items = [(str(i), m) for i, (_, m) in enumerate(items)]
    new = copy.copy(container)
    new._modules = OrderedDict(items)
    return new


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` (``""``: it becomes the model); return the model."""
    if not path:
        return module
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
    return model


def remove_layer(model: nn.Module, name: str) -> nn.Module:
    """Remove layer ``name`` (an element of a Sequential/ModuleList); return the model
    (a new object only when the model itself is that container)."""
    parent, _, leaf = name.rpartition(".")
    container = model.get_submodule(parent)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)) or leaf not in container._modules:
        raise ModelError(f"layer {name!r} is not an element of a Sequential or ModuleList")
    return _swap(model, parent, _without(container, leaf))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _rebuilds(model: nn.Module) -> bool:
    """True unless ``model`` is a reference model whose ``arch_config()`` rebuilds to other
    tensor names or shapes (checked on the meta device)."""
    config = getattr(model, "arch_config", None)
    if not callable(config) or not isinstance(getattr(type(model), "arch_name", None), str):
        return True
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            rebuilt = type(model)(**config())
    except Exception:  # an arch_config that cannot express the removal
        return False
    return _shapes(rebuilt) == _shapes(model)


def _has_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def _elements(model: nn.Module) -> list[str]:
    """Names of weight-holding elements of every Sequential / ModuleList, in model order."""
    return [f"{path}.{leaf}" if path else leaf for path, m in model.named_modules()
            if isinstance(m, (nn.Sequential, nn.ModuleList))
            for leaf, child in m.named_children() if _has_matrix(child)]


def _output(model: nn.Module, x: inputs.Inputs) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            out = inputs.call(model, x)
    except Exception:  # the removal broke a shape: not a candidate
        return None
    return out if isinstance(out, torch.Tensor) else None


def _trial(model: nn.Module, name: str, check: Callable[[nn.Module], float | None]
           ) -> float | None:
    """``check`` on the model with ``name`` removed; the model is restored afterwards."""
    parent, _, leaf = name.rpartition(".")
    container = model.get_submodule(parent)
    trial = _swap(model, parent, _without(container, leaf))
    try:
        return check(trial)
    finally:
        _swap(trial, parent, container)


def _loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    total = seen = 0.0
    with torch.no_grad():
        for x, y in batches:
            total += float(F.cross_entropy(inputs.call(model, x), y, reduction="sum"))
            seen += len(y)
    return total / seen if seen else 0.0


def removable_layers(model: nn.Module, example: torch.Tensor
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(candidates, refused)``: layers whose removal keeps the output shape on
    ``example`` ``[B, *input_shape]`` and the architecture record (see the module
    docstring), and the other weight-holding elements. Pure: ``model`` ends unchanged."""
    was_training = model.training
    model.eval()
    try:
        reference = _output(model, example)
        if reference is None:
            raise ModelError(f"model {type(model).__name__} fails on an example batch of "
                             f"shape {tuple(example.shape)}")

        def keeps(trial: nn.Module) -> float | None:
            out = _output(trial, example)
            ok = out is not None and out.shape == reference.shape and _rebuilds(trial)
            return 1.0 if ok else None

        names = _elements(model)
        ok = [n for n in names if _trial(model, n, keeps) is not None]
    finally:
        model.train(was_training)
    return tuple(ok), tuple(n for n in names if n not in ok)


def layer_scores(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]
                 ) -> dict[str, float]:
    """Training-loss increase (nats per sample, eval mode) when each layer is removed."""
    was_training = model.training
    model.eval()
    try:
        base = _loss(model, batches)
        return {n: _trial(model, n, lambda m: _loss(m, batches)) - base for n in names}
    finally:
        model.train(was_training)


def _first_batches(ctx: Context, count: int, model: nn.Module) -> list[Batch]:
    """The first ``count`` training batches; unlabelled ones get the teacher's (or, with
    none, ``model``'s own) class probabilities as soft labels, so the loss a removal
    raises is its distance from the teacher."""
    reseed_loader(ctx.data.train, ctx.seed)
    batches: list[Batch] = []
    for x, y in ctx.data.train:
        batches.append((x, y))
        if len(batches) == count:
            break
    if not batches:
        raise ModelError(f"layer_prune: the train loader of {ctx.data.name!r} is empty")
    return soft_labels(batches, ctx.teacher_model(model))


def _remap_masks(ctx: Context, before: dict[int, str], model: nn.Module) -> None:
    """Follow renamed parameters (by identity); drop the masks of removed ones."""
    now = {id(p): n for n, p in model.named_parameters()}
    renamed = {before[i]: n for i, n in now.items() if i in before}
    kept = {renamed[n]: m for n, m in ctx.masks.items() if n in renamed}
    ctx.masks.clear()
    ctx.masks.update(kept)


def _size(model: nn.Module, config: LayerPruneConfig, example: torch.Tensor) -> float:
    if config.macs_reduction is not None:
        from nncompress.measure import count_macs
        return float(count_macs(model, example).total)
    return float(sum(p.numel() for p in model.parameters()))


def _done(removed: int, size: float, start: float, config: LayerPruneConfig) -> bool:
    if config.count is not None:
        return removed >= config.count
    target = config.params_reduction or config.macs_reduction
    assert target is not None
    return size <= start / target


def _select(names: Sequence[str], config: LayerPruneConfig) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.layers)
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]


def layer_prune(model: nn.Module, config: LayerPruneConfig, ctx: Context) -> nn.Module:
    """Greedily remove the layer whose removal raises the training loss least, until
    ``count`` layers are gone or the size target is met; then fine-tune."""
    batches = _first_batches(ctx, config.batches, model)
    example = inputs.take(batches[0][0], 1)
    start = _size(model, config, example)
    candidates, refused = removable_layers(model, example)
    if refused:
        ctx.note(f"layer_prune: not removable (output shape or architecture record would "
                 f"change): {', '.join(refused)}")
    if not _select(candidates, config):
        raise UnsupportedLayerError(
            f"layer_prune: {type(model).__name__} has no removable layer matching "
            f"layers={list(config.layers)} exclude={list(config.exclude)}; removable: "
            f"{', '.join(candidates) or 'none'}; refused: {', '.join(refused) or 'none'}")
    removed: list[str] = []
    size = start
    while not _done(len(removed), size, start, config):
        chosen = _select(removable_layers(model, example)[0], config)
        if not chosen:
            raise ConstraintError(
                f"layer_prune: target not reached after removing {len(removed)} layers "
                f"({', '.join(removed) or 'none'}): no removable layer is left")
        scores = layer_scores(model, chosen, batches)
        name = min(chosen, key=lambda n: (scores[n], n))
        params_before = {id(p): n for n, p in model.named_parameters()}
        model = remove_layer(model, name)
        _remap_masks(ctx, params_before, model)
        size = _size(model, config, example)
        removed.append(name)
        ctx.note(f"layer_prune: removed {name} (training loss +{scores[name]:.4f} nats; "
                 f"others: {', '.join(f'{n} +{v:.4f}' for n, v in sorted(scores.items()))})")
    unit = "MACs per sample" if config.macs_reduction is not None else "params"
    ctx.note(f"layer_prune: removed {len(removed)} layers: {start:.0f} -> {size:.0f} {unit}")
    if config.epochs > 0:
        ctx.fine_tune(model, epochs=config.epochs, lr=config.lr, desc="layer-prune fine-tune")
    return model


TECHNIQUES.register("layer_prune", Technique(
    name="layer_prune",
    category="pruning",
    paper="Chen & Zhao (2018): Shallowing deep networks: layer-wise pruning based on "
          "feature representations",
    summary="Remove whole residual blocks / stacked layers, greedily the one whose removal "
            "raises the training loss least, to a count or a params/MACs target; then "
            "fine-tune.",
    config=LayerPruneConfig,
    apply=layer_prune,
))
