"""Feature (hint) distillation: forward hooks on named layers, adapters and hint losses.

- :class:`FeatureTap` -- a context manager capturing the outputs of named submodules.
- :class:`Adapter` -- Romero et al. (2015), "FitNets: hints for thin deep nets": the
  regressor that maps the student's guided layer to the teacher's hint width (a 1x1 conv /
  linear over the channel dimension; identity when the widths agree).
- :class:`HintLoss` -- per (student layer, teacher layer) pair: pool to a common spatial
  size, adapt the width, then an MSE (FitNets' hint loss) or the angular loss of
  ShrinkTeaNet (Duong et al. 2019); summed over pairs.
- :class:`FeatureDistiller` -- taps on a student and its teacher plus a :class:`HintLoss`
  whose shapes are read from one example forward.

Feature layouts: a conv / norm layer's output is channels first (``[B, C]``, ``[B, C, L]``,
``[B, C, H, W]``); a Linear / LayerNorm / RNN / attention output is channels last
(``[B, L, C]``). :func:`channel_dim_of` decides which from the layer's type (table
``CHANNEL_DIMS``), else from the last typed layer inside it, else from the last typed layer
before it; ``channel_dims`` overrides it by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nncompress import inputs
from nncompress.distill.losses import AngularLoss, CosineLoss, MSELoss
from nncompress.errors import ModelError, RecipeError
from nncompress.inputs import Inputs

__all__ = ["CHANNEL_DIMS", "HINT_LOSSES", "Adapter", "Distilled", "FeatureDistiller",
           "FeatureTap", "HintLoss", "channel_dim_of", "resolve"]

#: Layer type -> dimension of its output that holds the channels / features.
CHANNEL_DIMS: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.modules.conv._ConvNd, 1), (nn.modules.batchnorm._BatchNorm, 1), (nn.GroupNorm, 1),
    (nn.modules.instancenorm._InstanceNorm, 1),
    (nn.Linear, -1), (nn.LayerNorm, -1), (nn.RNNBase, -1), (nn.Embedding, -1),
    (nn.MultiheadAttention, -1), (nn.TransformerEncoderLayer, -1),
)

#: Hint loss name -> loss ``(student_feats, teacher_feats) -> scalar``.
HINT_LOSSES: Mapping[str, type[nn.Module]] = MappingProxyType(
    {"mse": MSELoss, "angular": AngularLoss, "cosine": CosineLoss})


def resolve(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``; a missing name is a one-line ModelError naming it and
    the closest existing names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = (f"close names: {', '.join(close)}" if close else
                f"its layers include {', '.join(names[:4]) or '(none)'}")
        raise ModelError(f"no layer {name!r} in {type(model).__name__}; {hint}") from None


def _typed_dim(module: nn.Module) -> int | None:
    for cls, dim in CHANNEL_DIMS:
        if isinstance(module, cls):
            return dim
    return None


def channel_dim_of(model: nn.Module, name: str) -> int:
    """The channel dimension (1 or -1) of the output of layer ``name`` (see the module
    docstring); 1 when nothing tells."""
    module = resolve(model, name)
    dim = _typed_dim(module)
    if dim is not None:
        return dim
    inside = [d for m in module.modules() if (d := _typed_dim(m)) is not None]
    if inside:
        return inside[-1]
    before: list[int] = []
    for other_name, other in model.named_modules():
        if other_name == name:
            break
        if (d := _typed_dim(other)) is not None:
            before.append(d)
    return before[-1] if before else 1


def _first_tensor(out: Any, name: str) -> torch.Tensor:
    """A layer's output tensor (the first element of a tuple: an RNN's output sequence)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"layer {name!r} outputs {type(out).__name__}, not a tensor")
    return out


class FeatureTap:
    """Captures the outputs of ``model``'s submodules ``names`` while active.

    ``with FeatureTap(model, ["features.conv2"]) as tap: model(x); f = tap["features.conv2"]``.
    Each forward call overwrites the stored outputs (a module called twice in one forward
    keeps its last output; a tuple output keeps its first tensor). The hooks are removed
    on exit, also when the block raises. ``detach=True`` stores detached tensors.
    """

    def __init__(self, model: nn.Module, names: str | Sequence[str], *,
                 detach: bool = False) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names:
            raise ModelError("FeatureTap needs at least one layer name")
        self.model = model
        self.modules = {n: resolve(model, n) for n in names}
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out, name)
            self.outputs[name] = t.detach() if self.detach else t
        return hook

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise ModelError("this FeatureTap is already active")
        self.outputs.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise ModelError(f"layer {name!r} produced no output (not tapped, or it did not "
                             "run in the last forward)")
        return self.outputs[name]


class Adapter(nn.Module):
    """FitNets' regressor (Romero et al. 2015): maps student features of width
    ``in_features`` to the teacher's ``out_features`` along ``channel_dim``.

    A linear map over the channel dimension, i.e. a 1x1 conv for ``[B, C, L]`` /
    ``[B, C, H, W]`` (``channel_dim=1``) and a Linear for ``[B, C]`` or ``[B, L, C]``
    (``channel_dim=-1``); no parameters (identity) when the widths are equal.
    """

    def __init__(self, in_features: int, out_features: int, channel_dim: int = 1) -> None:
        super().__init__()
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise RecipeError(f"Adapter {what} must be a positive int, got {v!r}")
        if channel_dim not in (1, -1):
            raise RecipeError(f"Adapter channel_dim must be 1 or -1, got {channel_dim!r}")
        self.in_features, self.out_features = in_features, out_features
        self.channel_dim = channel_dim
        self.proj: nn.Module = (nn.Identity() if in_features == out_features
                                else nn.Linear(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, ..., in_features, ...]`` -> same with ``out_features``."""
        if x.dim() < 2 or x.shape[self.channel_dim] != self.in_features:
            raise ModelError(f"Adapter for {self.in_features} features got features of shape "
                             f"{list(x.shape)} (channel dim {self.channel_dim})")
        if self.in_features == self.out_features:
            return x
        return self.proj(x.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)


def _channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x if channel_dim == 1 or x.dim() == 2 else x.movedim(channel_dim, 1)


def _pool(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Channels-first ``x`` ``[B, C, *spatial]`` average-pooled to ``size`` (adaptive)."""
    if tuple(x.shape[2:]) == size:
        return x
    pools = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    return pools[len(size)](x, size)


class _PairPlan(NamedTuple):
    student: str
    teacher: str
    student_dim: int
    teacher_dim: int
    size: tuple[int, ...]


class HintLoss(nn.Module):
    """Hint distillation between layer pairs (FitNets, Romero et al. 2015; or ShrinkTeaNet's
    angular loss, Duong et al. 2019).

    - ``pairs``: ``(student layer, teacher layer)`` names; ``student_shapes`` /
      ``teacher_shapes``: each layer's output shape per sample (no batch dimension);
      ``student_dims`` / ``teacher_dims``: layer name -> 1 (channels first) or -1
      (channels last), default 1.
    - Per pair, both features are laid out channels first ``[B, C, *spatial]``; where the
      spatial sizes differ, both are adaptive-average-pooled to the smaller size in every
      spatial dimension; the student's are then mapped to the teacher's width by an
      :class:`Adapter` (a trainable 1x1 conv / linear, identity when the widths agree;
      its parameters are this module's: train them with the student).
    - ``loss``: ``"mse"`` (mean squared error: FitNets' ``1/2 ||.||^2`` up to a constant
      factor), ``"angular"`` (:class:`~nncompress.distill.losses.AngularLoss` on the
      features flattened per sample) or ``"cosine"``; summed over the pairs.

    ``forward(student_feats, teacher_feats)``: name -> tensor mappings (teacher detached).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]],
                 student_shapes: Mapping[str, Sequence[int]],
                 teacher_shapes: Mapping[str, Sequence[int]], *, loss: str = "mse",
                 student_dims: Mapping[str, int] | None = None,
                 teacher_dims: Mapping[str, int] | None = None) -> None:
        super().__init__()
        if loss not in HINT_LOSSES:
            raise RecipeError(f"hint loss must be one of {', '.join(HINT_LOSSES)}, got {loss!r}")
        if not pairs:
            raise RecipeError("HintLoss needs at least one (student, teacher) layer pair")
        dims = (dict(student_dims or {}), dict(teacher_dims or {}))
        self.loss_fn = HINT_LOSSES[loss]()
        self.plans: list[_PairPlan] = []
        self.adapters = nn.ModuleList()
        for s_name, t_name in pairs:
            plan, adapter = self._plan(s_name, t_name, student_shapes, teacher_shapes, dims)
            self.plans.append(plan)
            self.adapters.append(adapter)

    @staticmethod
    def _plan(s_name: str, t_name: str, student_shapes: Mapping[str, Sequence[int]],
              teacher_shapes: Mapping[str, Sequence[int]],
              dims: tuple[Mapping[str, int], Mapping[str, int]]) -> tuple[_PairPlan, Adapter]:
        for name, shapes in ((s_name, student_shapes), (t_name, teacher_shapes)):
            if name not in shapes or len(shapes[name]) < 1:
                raise ModelError(f"no per-sample feature shape for layer {name!r}")
        s_dim, t_dim = dims[0].get(s_name, 1), dims[1].get(t_name, 1)
        if s_dim not in (1, -1) or t_dim not in (1, -1):
            raise RecipeError(f"hint pair {s_name!r} -> {t_name!r}: channel dims must be 1 or "
                              f"-1, got {s_dim!r} and {t_dim!r}")
        s_shape, t_shape = list(student_shapes[s_name]), list(teacher_shapes[t_name])
        s_c, t_c = s_shape.pop(s_dim - 1 if s_dim > 0 else -1), t_shape.pop(
            t_dim - 1 if t_dim > 0 else -1)
        if len(s_shape) != len(t_shape) or len(s_shape) > 3:
            raise ModelError(f"hint pair {s_name!r} -> {t_name!r}: features "
                             f"{list(student_shapes[s_name])} and {list(teacher_shapes[t_name])}"
                             " have different (or more than 3) spatial dimensions")
        size = tuple(min(a, b) for a, b in zip(s_shape, t_shape, strict=True))
        return _PairPlan(s_name, t_name, s_dim, t_dim, size), Adapter(int(s_c), int(t_c), 1)

    def pair_features(self, student_feats: Mapping[str, torch.Tensor],
                      teacher_feats: Mapping[str, torch.Tensor]
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per pair: (adapted student features, teacher features), both ``[B, C_t, *size]``."""
        out = []
        for plan, adapter in zip(self.plans, self.adapters, strict=True):
            s = _pool(_channels_first(student_feats[plan.student], plan.student_dim), plan.size)
            t = _pool(_channels_first(teacher_feats[plan.teacher].detach(), plan.teacher_dim),
                      plan.size)
            out.append((adapter(s), t))
        return out

    def forward(self, student_feats: Mapping[str, torch.Tensor],
                teacher_feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pairs = self.pair_features(student_feats, teacher_feats)
        return sum((self.loss_fn(s, t) for s, t in pairs), torch.zeros(()).to(pairs[0][0]))


class Distilled(NamedTuple):
    """One :class:`FeatureDistiller` step: both models' outputs and the hint loss."""

    student_out: Any
    teacher_out: Any
    hint: torch.Tensor


def _feature_shapes(model: nn.Module, names: Sequence[str], example: Inputs
                    ) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of ``names`` on ``example`` (eval mode, no grad; the
    model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FeatureTap(model, names) as tap:
            inputs.call(model, example)
            return {n: tuple(tap[n].shape[1:]) for n in names}
    finally:
        model.train(was_training)


class FeatureDistiller(nn.Module):
    """Hint distillation between a student and its teacher (FitNets, Romero et al. 2015;
    ShrinkTeaNet's angular loss, Duong et al. 2019): taps on both, a :class:`HintLoss`.

    - ``pairs``: ``{student layer: teacher layer}`` or ``[(student, teacher), ...]``; a
      name that does not exist is a one-line ModelError listing close names.
    - ``example``: inputs the feature shapes are read from (one forward of each model in
      eval mode). ``channel_dims`` overrides :func:`channel_dim_of` by layer name.
    - ``perturb``: applied to the teacher's features (RONA: ``NoisyTeacher.perturb``).

    ``distiller(x)`` runs the teacher (no grad) and the student on ``x`` and returns
    :class:`Distilled` ``(student_out, teacher_out, hint)``; the hooks live only during
    that call. The models are not submodules: ``distiller.parameters()`` are the
    adapters' (train them with the student); the models' train / eval modes are the
    caller's.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 pairs: Mapping[str, str] | Sequence[tuple[str, str]], example: Inputs, *,
                 loss: str = "mse", channel_dims: Mapping[str, int] | None = None,
                 perturb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        pair_list = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        self.student_names = tuple(dict.fromkeys(s for s, _ in pair_list))
        self.teacher_names = tuple(dict.fromkeys(t for _, t in pair_list))
        for model, names in ((student, self.student_names), (teacher, self.teacher_names)):
            for name in names:
                resolve(model, name)
        overrides = dict(channel_dims or {})
        s_dims, t_dims = ({n: overrides.get(n, channel_dim_of(m, n)) for n in names}
                          for m, names in ((student, self.student_names),
                                           (teacher, self.teacher_names)))
        self._models = (student, teacher)
        self.perturb = perturb
        self.hint_loss = HintLoss(pair_list, _feature_shapes(student, self.student_names, example),
                                  _feature_shapes(teacher, self.teacher_names, example),
                                  loss=loss, student_dims=s_dims, teacher_dims=t_dims)

    def forward(self, x: Inputs) -> Distilled:
        student, teacher = self._models
        with torch.no_grad(), FeatureTap(teacher, self.teacher_names, detach=True) as t_tap:
            teacher_out = inputs.call(teacher, x)
        t_feats = {n: t_tap[n] for n in self.teacher_names}
        if self.perturb is not None:
            t_feats = {n: self.perturb(f) for n, f in t_feats.items()}
        with FeatureTap(student, self.student_names) as s_tap:
            student_out = inputs.call(student, x)
        s_feats = {n: s_tap[n] for n in self.student_names}
        return Distilled(student_out, teacher_out, self.hint_loss(s_feats, t_feats))
