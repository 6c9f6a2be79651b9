"""Pluggable quality metrics: how good a model's outputs are, with or without labels.

A metric compares the model's outputs on a loader with the labels, or with a *teacher*'s
outputs on the same inputs (the uncompressed model, when ``compress`` measures). Every
table names the metric it shows. Registered metrics (:data:`METRICS`):

=============  =======================================================  ======  =======
name           value                                                    labels  teacher
=============  =======================================================  ======  =======
``accuracy``   top-1 accuracy: arg-max output == label, in [0, 1]       yes     no
``agreement``  top-1 agreement with the teacher's arg-max, in [0, 1]    no      yes
``cosine``     mean over samples of cos(output, teacher output)         no      yes
``mse``        mean squared error to float labels (regression targets   either  either
               shaped like the outputs), else to the teacher's outputs
``r2``         coefficient of determination 1 - SSE / SST (targets as   either  either
               for ``mse``), pooled over every output element
``kl``         mean KL(softmax(teacher) || softmax(model)), in nats     no      yes
=============  =======================================================  ======  =======

Outputs are flattened per sample (``[B, ...] -> [B, D]``) for ``cosine`` / ``mse`` /
``r2``, so a model that outputs an embedding ``[B, D]`` or a sequence of them is scored the
same way. ``higher_is_better`` is False for ``mse`` and ``kl``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncompress import inputs
from nncompress.errors import DataError
from nncompress.measure._common import call_model, eval_mode, first_param
from nncompress.registry import Registry

__all__ = ["METRICS", "Metric", "check_metric", "default_metric", "quality", "soft_labels",
           "top1"]

#: Running sums of one metric: (batch outputs, teacher outputs or None, labels or None,
#: sums so far) -> updated sums; then sums -> value.
Update = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, float]],
                  None]


@dataclass(frozen=True)
class Metric:
    """A quality metric: ``label`` for tables (e.g. ``"cosine to teacher"``), whether it
    needs labels / a teacher (``"either"`` for ``mse`` / ``r2``: labels when there are some),
    the direction, and its accumulate / finish functions."""

    name: str
    label: str
    labels: str  # "yes", "no" or "either"
    higher_is_better: bool
    update: Update
    finish: Callable[[dict[str, float]], float]

    def needs_teacher(self, labelled: bool) -> bool:
        """True when this metric compares with a teacher on data that is / is not
        labelled."""
        return self.labels == "no" or (self.labels == "either" and not labelled)

    def uses_teacher(self) -> bool:
        """True when a teacher's outputs take part (given one)."""
        return self.labels != "yes"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(len(t), -1).float()


def _acc_update(out: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
                s: dict[str, float]) -> None:
    assert y is not None
    s["hit"] = s.get("hit", 0.0) + float((out.argmax(dim=-1) == y).sum())
    s["n"] = s.get("n", 0.0) + y.numel()


def _agree_update(out: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
                  s: dict[str, float]) -> None:
    assert teacher is not None
    same = out.argmax(dim=-1) == teacher.argmax(dim=-1)
    s["hit"] = s.get("hit", 0.0) + float(same.sum())
    s["n"] = s.get("n", 0.0) + same.numel()


def _cos_update(out: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
                s: dict[str, float]) -> None:
    assert teacher is not None
    cos = F.cosine_similarity(_flat(out), _flat(teacher), dim=1, eps=1e-12)
    s["hit"] = s.get("hit", 0.0) + float(cos.sum())
    s["n"] = s.get("n", 0.0) + len(cos)


def _target(teacher: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    target = y if y is not None and y.is_floating_point() else teacher
    if target is None:
        raise DataError("metric 'mse' / 'r2' needs float regression targets or a teacher; "
                        "got class labels and no teacher")
    return target


def _sq_update(out: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
               s: dict[str, float]) -> None:
    target = _flat(_target(teacher, y).reshape(out.shape))
    pred = _flat(out)
    s["sse"] = s.get("sse", 0.0) + float(((pred - target) ** 2).sum())
    s["sum"] = s.get("sum", 0.0) + float(target.sum())
    s["sq"] = s.get("sq", 0.0) + float((target.double() ** 2).sum())
    s["n"] = s.get("n", 0.0) + target.numel()


def _r2(s: dict[str, float]) -> float:
    sst = s["sq"] - s["sum"] ** 2 / s["n"]
    return 1.0 - s["sse"] / sst if sst > 0 else float("nan")


def _kl_update(out: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
               s: dict[str, float]) -> None:
    assert teacher is not None
    kl = F.kl_div(F.log_softmax(out.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                  reduction="sum", log_target=True)
    s["hit"] = s.get("hit", 0.0) + float(kl)
    s["n"] = s.get("n", 0.0) + out.reshape(-1, out.shape[-1]).shape[0]


def _mean(s: dict[str, float]) -> float:
    return s["hit"] / s["n"]


#: metric name -> Metric.
METRICS: Registry[Metric] = Registry("quality metric", error=DataError)
for _m in (
    Metric("accuracy", "accuracy", "yes", True, _acc_update, _mean),
    Metric("agreement", "top-1 agreement with teacher", "no", True, _agree_update, _mean),
    Metric("cosine", "cosine to teacher", "no", True, _cos_update, _mean),
    Metric("mse", "MSE", "either", False, _sq_update, lambda s: s["sse"] / s["n"]),
    Metric("r2", "R²", "either", True, _sq_update, _r2),
    Metric("kl", "KL to teacher (nats)", "no", False, _kl_update, _mean),
):
    METRICS.register(_m.name, _m)
del _m


def _output(value: Any, who: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DataError(f"the quality metric needs the {who} to return one tensor, got "
                        f"{type(value).__name__}")
    return value


def check_metric(metric: str, *, labelled: bool, has_teacher: bool) -> Metric:
    """The :class:`Metric` named ``metric``; a one-line DataError when it needs labels the
    data lacks, or a teacher that was not given."""
    found = METRICS.get(metric)
    if found.labels == "yes" and not labelled:
        raise DataError(f"quality metric {metric!r} needs labelled data; the data has inputs "
                        f"only (use one of: {', '.join(_label_free())})")
    if found.needs_teacher(labelled) and not has_teacher:
        raise DataError(f"quality metric {metric!r} compares with a teacher's outputs; "
                        "none was given")
    return found


def default_metric(labelled: bool) -> str:
    """``"accuracy"`` for labelled data; ``"agreement"`` (top-1 agreement with the teacher:
    a classifier is the default model) for inputs only. A model whose output is an
    embedding or a regression names its metric (``cosine``, ``mse``, ``r2``), and ``loss:
    auto`` then distils with the matching loss."""
    return "accuracy" if labelled else "agreement"


def _label_free() -> list[str]:
    return [n for n in METRICS.names() if METRICS.get(n).labels != "yes"]


def quality(model: nn.Module, loader: Iterable[Any], metric: str = "accuracy", *,
            teacher: nn.Module | None = None) -> float:
    """The value of ``metric`` for ``model`` on ``loader`` (batches ``(x, y)`` or
    ``(x, None)``), comparing with ``teacher``'s outputs where the metric needs them.

    Runs both models in eval mode under ``torch.inference_mode`` (each module's train/eval
    flag is restored afterwards).
    """
    p = first_param(model)
    device = p.device if p is not None else torch.device("cpu")
    sums: dict[str, float] = {}
    found: Metric | None = None
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            x, y = inputs.to(batch[0], device), batch[1]
            if found is None:
                found = check_metric(metric, labelled=y is not None,
                                     has_teacher=teacher is not None)
            y = y.to(device) if y is not None else None
            out = _output(call_model(model, x), "model")
            ref = None
            if teacher is not None and found.uses_teacher():
                with eval_mode(teacher):
                    ref = _output(call_model(teacher, x), "teacher")
            found.update(out, ref, y, sums)
    if found is None or not sums.get("n"):
        raise DataError(f"cannot measure {metric}: the loader yields no samples")
    return found.finish(sums)


def soft_labels(batches: Iterable[tuple[Any, torch.Tensor | None]], teacher: nn.Module
                ) -> list[tuple[Any, torch.Tensor]]:
    """``batches`` with every missing label (``(x, None)``) replaced by the teacher's class
    probabilities ``softmax(teacher(x))`` ``[B, C]`` (labels that are there are kept).

    ``F.cross_entropy`` takes such probabilities as targets (soft-target cross-entropy =
    KL to the teacher + a constant), so a label-free stage scores a change by how far it
    moves the model from its teacher; :func:`top1` turns them back into classes.
    """
    out: list[tuple[Any, torch.Tensor]] = []
    with eval_mode(teacher), torch.no_grad():
        for x, y in batches:
            if y is None:
                y = torch.softmax(_output(call_model(teacher, x), "teacher").float(), dim=-1)
            out.append((x, y))
    return out


def top1(y: torch.Tensor) -> torch.Tensor:
    """Class labels: ``y`` itself, or the arg-max of soft labels ``[B, C]``."""
    return y.argmax(dim=-1) if y.is_floating_point() else y
