"""FSKD, few-sample knowledge distillation (Li, Li, Liu & Zhang, CVPR 2020).

"Few Sample Knowledge Distillation for Efficient Network Compression": the compressed
model (the *student*, e.g. after structured pruning) is repaired from a few unlabelled
inputs, without any training. After each block of the student a 1x1 convolution ``Q``
(a linear map over channels, no non-linearity) is added; ``Q`` is fitted by least squares
so that the student block's output matches the teacher block's output on the samples; the
blocks are fitted one after the other in the order the model runs them, each on features
computed by the student's already-corrected earlier blocks; finally every ``Q`` is merged
into the layer that produces its input, so the student keeps its size and cost.

What FSKD means here, precisely:

- A *block* ends at every Conv1d / Conv2d / Linear (``groups=1``) of the student; the
  matched feature is that layer's own output (before any BatchNorm / activation, where the
  paper puts ``Q``: before the non-linearity). Teacher and student layers are paired by
  name. A BatchNorm that follows acts per channel and structured pruning keeps its entries
  of the kept channels, so matching before or after it gives the same ``Q`` (every row of
  ``Q`` is its own least-squares problem, and the BatchNorm only rescales and shifts it).
- Where the student layer is narrower than the teacher's (a pruned layer), its channels
  are matched to the teacher's channels they came from: the order-preserving assignment
  of greatest total correlation over the samples (pruning keeps the surviving units in
  their order); equal widths are matched one to one. ``Q`` is then ``[C_s, C_s]``.
- Fit: ``Q = I + D`` with ``D = argmin ||S D^T - (T - S)||^2 + lam ||D||^2``, ``S [N, C_s]``
  the student's output rows (every sample and spatial position), ``T [N, C_s]`` the
  teacher's matched rows; ``lam = ridge * mean(diag(S^T S))`` shrinks the correction
  towards none. A layer with a bias also gets an offset (merged into the bias); a layer
  without one gets none, so the merged model has exactly the student's parameters.
- Merge (the paper's theorem): ``Q(W * x + b) + c = (Q W) * x + (Q b + c)``, with
  ``(Q W)[o] = sum_c Q[o, c] W[c]`` over the output channels of ``W [C_out, C_in, *k]``;
  exact for any kernel, stride, padding or dilation (:func:`merge_pointwise`).

Left as they are, and named in the log: parameterised modules other than Conv1d / Conv2d /
Linear with ``groups=1`` and BatchNorm1d / 2d (a grouped convolution, an RNN, a LayerNorm,
an embedding, ...) and layers called more than once per forward. The maps are fitted on
the Conv / Linear layers around them, on features computed through them, so a model built
of PyTorch's own blocks (RNN classifiers, transformer encoders after
:func:`~nncompress.modules.decompose`) is repaired where it can be.

Refused before the model is touched, each named: a model with nothing left to fit; a
fitted layer missing from the teacher, of another type there, wider than the teacher's,
or whose output shape differs from the teacher's in more than the channels; pruned
connections (masks), which merging ``Q`` would fill.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn

import numpy as np
import torch
from pydantic import Field
from torch import nn

from nncompress import inputs
from nncompress.data.core import first_samples
from nncompress.errors import ConstraintError, RecipeError, UnsupportedLayerError
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig
from nncompress.train import reseed_loader

__all__ = ["FSKDConfig", "fit_pointwise", "fskd", "match_channels", "merge_pointwise"]

#: Layers a pointwise map ``Q`` is fitted after and merged into.
FITTED: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
#: Parameterised layers left as they are (per-channel, so channel matching carries over).
PASSIVE: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)

Note = Callable[[str], None]
#: Smallest relative damping of the least-squares systems (``ridge=0`` is plain least
#: squares up to this; a dead channel's correction stays zero).
EPS = 1e-10


class FSKDConfig(TechniqueConfig):
    """Parameters of ``fskd``.

    - ``samples``: training inputs the maps are fitted on (their labels are never read;
      the paper uses ~1 % of the training set).
    - ``ridge``: Tikhonov damping of each correction, relative to the mean diagonal of the
      student features' Gram matrix (0: plain least squares).
    - ``teacher``: ``"original"``, the uncompressed input model of the ``compress`` run.
    """

    samples: int = Field(default=40, ge=1)
    ridge: float = Field(default=1e-3, ge=0.0)
    teacher: Literal["original"] = "original"


def _pointwise_of(q: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Q [O', O], c [O'] or None)`` of a pointwise module that may follow ``layer``."""
    if isinstance(layer, nn.Linear) and type(q) is nn.Linear:
        return q.weight.detach(), None if q.bias is None else q.bias.detach()
    conv = type(layer) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else None
    if (conv is not None and type(q) is conv and q.groups == 1
            and all(k == 1 for k in q.kernel_size) and all(s == 1 for s in q.stride)
            and not isinstance(q.padding, str) and all(p == 0 for p in q.padding)):
        w = q.weight.detach()
        return w.reshape(w.shape[0], w.shape[1]), None if q.bias is None else q.bias.detach()
    raise UnsupportedLayerError(f"merge_pointwise: {q!r} is not a pointwise map (a 1x1, "
                                f"stride-1, unpadded, ungrouped {type(layer).__name__} or a "
                                "Linear after a Linear) that can follow the layer")


def merge_pointwise(layer: nn.Module, q: torch.Tensor | nn.Module,
                    offset: torch.Tensor | None = None) -> nn.Module:
    """A new layer computing ``q(layer(x))`` exactly, of ``layer``'s type and cost.

    ``layer``: a Conv1d / Conv2d with ``groups=1`` or a Linear, weight ``[O, C_in, *k]``.
    ``q``: a matrix ``[O', O]`` over the output channels (with ``offset [O']`` added after
    it), or a 1x1 convolution of the same kind / a Linear (its bias is the offset). The
    result has weight ``[O', C_in, *k]`` = ``sum_c q[o', c] W[c]`` and bias ``q b + offset``
    (none when neither ``layer`` nor ``q`` has one); ``layer`` is left unchanged.
    """
    if type(layer) not in FITTED or getattr(layer, "groups", 1) != 1:
        raise UnsupportedLayerError(f"merge_pointwise: cannot merge into {layer!r}; only "
                                    "Conv1d / Conv2d with groups=1 and Linear")
    if isinstance(q, nn.Module):
        if offset is not None:
            raise ValueError("merge_pointwise: give offset only with a matrix q")
        q, offset = _pointwise_of(q, layer)
    w = layer.weight.detach()
    if q.dim() != 2 or q.shape[1] != w.shape[0]:
        raise ConstraintError(f"merge_pointwise: q of shape {tuple(q.shape)} does not map the "
                              f"{w.shape[0]} outputs of {type(layer).__name__}")
    qd = q.detach().double()
    weight = torch.einsum("oc,c...->o...", qd, w.double())
    bias = None if layer.bias is None else qd @ layer.bias.detach().double()
    if offset is not None:
        bias = offset.detach().double() + (0.0 if bias is None else bias)
    merged = copy.deepcopy(layer)
    merged.weight = nn.Parameter(weight.to(w.dtype), requires_grad=layer.weight.requires_grad)
    merged.bias = None if bias is None else nn.Parameter(bias.to(w.dtype))
    setattr(merged, "out_features" if isinstance(layer, nn.Linear) else "out_channels",
            int(q.shape[0]))
    return merged


def match_channels(s: torch.Tensor, t: torch.Tensor) -> tuple[list[int], float]:
    """Which teacher channel each student channel came from.

    ``s [N, C_s]``, ``t [N, C_t]`` (``C_s <= C_t``): output rows of a student and a teacher
    layer. Returns the increasing indices ``idx [C_s]`` into the teacher's channels that
    maximise ``sum_i corr(s_i, t_idx[i])`` (dynamic programming, O(C_s * C_t)), and the mean
    correlation reached (1.0 when the student's channels are copies of the teacher's).
    """
    cs, ct = s.shape[1], t.shape[1]
    if cs > ct:
        raise ConstraintError(f"match_channels: the student has {cs} channels, more than "
                              f"the teacher's {ct}")

    def standard(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - x.double().mean(0)
        return x / (x.norm(dim=0) + 1e-12)

    corr = (standard(s).T @ standard(t)).numpy()  # [C_s, C_t]
    best = np.zeros(ct + 1)  # best[j]: best score of the channels so far within t[:j]
    cands = np.full((cs, ct + 1), -np.inf)
    for i in range(cs):
        cands[i, i + 1:] = best[i:-1] + corr[i, i:]
        best = np.maximum.accumulate(cands[i])
    idx, j = [], ct
    for i in range(cs - 1, -1, -1):
        reach = np.maximum.accumulate(cands[i])[j]
        j = int(np.flatnonzero(cands[i, : j + 1] == reach)[-1])
        idx.append(j - 1)
        j -= 1
    idx.reverse()
    return idx, float(corr[np.arange(cs), idx].mean())


def fit_pointwise(s: torch.Tensor, t: torch.Tensor, ridge: float, *, offset: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FSKD's least-squares map: ``(Q [C, C], c [C] or None)`` with ``s Q^T + c ~= t``.

    ``s``, ``t``: ``[N, C]`` student and (matched) teacher output rows. ``Q = I + D``, the
    correction ``D`` (and ``c``) damped by ``ridge * mean(diag(s^T s))`` (at least
    :data:`EPS` times it, keeping the system well posed); float64.
    """
    s, t = s.double(), t.double()
    a = torch.cat([s, torch.ones(len(s), 1, dtype=s.dtype)], 1) if offset else s
    gram = a.T @ a
    scale = float(gram.diagonal()[: s.shape[1]].mean()) or 1.0
    lam = max(ridge, EPS) * scale
    sol = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype),
                             a.T @ (t - s))  # [C (+1), C]
    q = torch.eye(s.shape[1], dtype=s.dtype) + sol[: s.shape[1]].T
    return q, (sol[s.shape[1]] if offset else None)


def _left_alone(student: nn.Module) -> list[str]:
    """Parameterised modules of ``student`` no map is fitted after, as ``name (what)``."""
    out = []
    for name, module in student.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        if type(module) in FITTED and getattr(module, "groups", 1) != 1:
            out.append(f"{name} ({type(module).__name__} groups={module.groups})")
        elif type(module) not in FITTED + PASSIVE:
            out.append(f"{name or '<model>'} ({type(module).__name__})")
    return out


def _rows(output: object, name: str) -> torch.Tensor:
    """A layer's output ``[B, C, *spatial]`` (conv) / ``[..., C]`` (Linear) as ``[N, C]``."""
    if not isinstance(output, torch.Tensor):
        raise UnsupportedLayerError(f"fskd: {name} does not return one tensor")
    return output.detach()


def _capture(model: nn.Module, names: Sequence[str], batches: Sequence[inputs.Inputs]
             ) -> tuple[list[str], dict[str, torch.Tensor], set[str]]:
    """Run ``model`` on ``batches``; returns the ``names`` in call order, their output rows
    ``[N, C]`` (float64, CPU) and the names called more than once per forward."""
    order: list[str] = []
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    repeated: set[str] = set()
    calls: dict[str, int] = {}

    def hook(name: str, layer: nn.Module) -> Callable[..., None]:
        def record(_m: nn.Module, _a: object, out: object) -> None:
            if name not in order:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
            y = _rows(out, name)
            if not isinstance(layer, nn.Linear):
                y = y.movedim(1, -1)
            seen[name].append(y.reshape(-1, y.shape[-1]).double().cpu())
        return record

    for x in batches:
        calls.clear()
        handles = [model.get_submodule(n).register_forward_hook(hook(n, model.get_submodule(n)))
                   for n in names]
        inputs.observe(model, [inputs.to(x, _device(model))], handles)
        repeated.update(n for n, c in calls.items() if c > 1)
    return order, {n: torch.cat(v) for n, v in seen.items() if v}, repeated


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _nothing_to_fit(student: nn.Module, left: Sequence[str]) -> NoReturn:
    raise UnsupportedLayerError(
        f"fskd: nothing to fit in the {type(student).__name__}: no Conv1d / Conv2d "
        f"(groups=1) or Linear runs once per forward"
        + (f" (left alone: {', '.join(left)})" if left else ""))


def _check(student: nn.Module, teacher: nn.Module, batches: Sequence[inputs.Inputs]
           ) -> tuple[list[str], dict[str, torch.Tensor], list[str]]:
    """Every refusal, before anything changes; returns the fitted layers in call order and
    the teacher's output rows per layer, and the layers left as they are."""
    left = _left_alone(student)
    names = [n for n, m in student.named_modules()
             if type(m) in FITTED and getattr(m, "groups", 1) == 1]
    if not names:
        _nothing_to_fit(student, left)
    teacher_layers = dict(teacher.named_modules())
    bad = [f"{n} ({type(student.get_submodule(n)).__name__} vs "
           f"{type(teacher_layers[n]).__name__ if n in teacher_layers else 'missing'})"
           for n in names if type(teacher_layers.get(n)) is not type(student.get_submodule(n))]
    if bad:
        raise UnsupportedLayerError(f"fskd pairs student and teacher layers by name; no "
                                    f"teacher layer of the same type for: {', '.join(bad)}")
    order, s_rows, s_rep = _capture(student, names, batches)
    _, t_rows, t_rep = _capture(teacher, order, batches)
    left += [f"{n} (called more than once per forward)" for n in sorted(s_rep | t_rep)]
    order = [n for n in order if n not in s_rep | t_rep]
    if not order:
        _nothing_to_fit(student, left)
    bad = [f"{n} (student {s_rows[n].shape[1]} vs teacher {t_rows[n].shape[1]} outputs"
           f"{', over other positions' if len(s_rows[n]) != len(t_rows[n]) else ''})"
           for n in order if len(s_rows[n]) != len(t_rows[n])
           or s_rows[n].shape[1] > t_rows[n].shape[1]]
    if bad:
        raise UnsupportedLayerError(f"fskd: student outputs that no teacher output matches: "
                                    f"{', '.join(bad)}")
    return order, t_rows, left


def _fit_layer(student: nn.Module, name: str, target: torch.Tensor,
               batches: Sequence[inputs.Inputs], ridge: float) -> str:
    """Fit and merge one layer's map ``Q``; returns a one-line account."""
    layer = student.get_submodule(name)
    s = _capture(student, [name], batches)[1][name]
    if s.shape[1] == target.shape[1]:
        idx, corr = list(range(s.shape[1])), None
    else:
        idx, corr = match_channels(s, target)
    t = target[:, idx]
    q, c = fit_pointwise(s, t, ridge, offset=layer.bias is not None)
    merged = merge_pointwise(layer, q, c)
    with torch.no_grad():
        layer.weight.copy_(merged.weight)
        if layer.bias is not None:
            layer.bias.copy_(merged.bias)
    after = s @ q.T + (0.0 if c is None else c)
    matched = (f"{s.shape[1]} of {target.shape[1]} teacher channels matched (mean "
               f"correlation {corr:.3f}), " if corr is not None else "")
    return (f"{name}: {matched}output MSE to the teacher {float(((s - t) ** 2).mean()):.4g}"
            f" -> {float(((after - t) ** 2).mean()):.4g} on {len(s)} rows")


def _fskd(student: nn.Module, teacher: nn.Module, batches: Sequence[inputs.Inputs],
          ridge: float, note: Note | None) -> nn.Module:
    order, targets, left = _check(student, teacher, batches)
    if left and note is not None:
        note(f"fskd: left as they are (no map fitted after them): {', '.join(left)}")
    for name in order:
        line = _fit_layer(student, name, targets[name], batches, ridge)
        if note is not None:
            note(f"fskd: {line}")
    return student


def fskd(student: nn.Module, teacher: nn.Module, samples_inputs: inputs.Inputs,
         ridge: float = 1e-3, *, note: Note | None = None) -> nn.Module:
    """Li et al. (2020) FSKD of ``student`` towards ``teacher``, in place; returns it.

    ``samples_inputs``: one batch of model inputs (a tensor ``[N, ...]`` or a tuple / dict
    of them; no labels). ``ridge``: see :class:`FSKDConfig`. ``note`` receives one line per
    fitted layer. Raises UnsupportedLayerError, naming the layers, for any student FSKD
    cannot handle (see the module docstring) before changing it.
    """
    if ridge < 0:
        raise ConstraintError(f"fskd: ridge must be >= 0, got {ridge!r}")
    return _fskd(student, teacher, [inputs.check(samples_inputs, "samples_inputs")], ridge,
                 note)


def _teacher_model(ctx: Context) -> nn.Module:
    """``teacher: original``: the run's uncompressed input model (``ctx.original``), else the
    training teacher's model."""
    model = ctx.original
    if model is None:
        teacher = ctx.teacher
        model = getattr(teacher, "model", teacher)  # a train.Teacher or a bare module
    if not isinstance(model, nn.Module):
        raise RecipeError("fskd needs a teacher, but this run has none (no original model "
                          "in the context; compress() provides it)")
    from nncompress.modules import decompose, needs_decompose

    if needs_decompose(model):
        # the run rewrote these built-ins in the student (compress: decompose); the
        # teacher gets the same rewrite, on a copy, so its layers pair with the student's
        model = decompose(copy.deepcopy(model))[0].eval()
    return model


def _apply(model: nn.Module, config: FSKDConfig, ctx: Context) -> nn.Module:
    """The registered technique: ``config.samples`` training inputs, the run's teacher."""
    teacher = _teacher_model(ctx)
    modules = dict(model.named_modules())
    masked = sorted(n for n in ctx.masks if n.endswith(".weight")
                    and type(modules.get(n.rsplit(".", 1)[0])) in FITTED)
    if masked:
        raise RecipeError(f"fskd would fill the pruned connections of {', '.join(masked)}; "
                          "run it before connection pruning")
    reseed_loader(ctx.data.train, ctx.seed)
    batches = [b for b in first_samples(ctx.data.train, config.samples)
               if inputs.batch_size(b)]
    if not batches:
        raise ConstraintError("fskd: the training split has no inputs")
    count = sum(inputs.batch_size(b) for b in batches)
    ctx.note(f"fskd: fitting on {count} training inputs (labels not read)")
    return _fskd(model, teacher, batches, config.ridge, ctx.note)


TECHNIQUES.register("fskd", Technique(
    name="fskd",
    category="knowledge-distillation",
    paper="Li, Li, Liu & Zhang (2020): Few sample knowledge distillation for "
          "efficient network compression",
    summary="Repair a pruned / decomposed model from a few unlabelled inputs: a 1x1 map "
            "after each Conv/Linear fitted by least squares to the teacher's features, "
            "merged into that layer (no training, no growth).",
    config=FSKDConfig,
    apply=_apply,
))
