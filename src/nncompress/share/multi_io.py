"""What a multi-model method (:mod:`nncompress.share.methods`) takes and gives: its
inputs (:class:`MultiInputs`), its result (:class:`MultiResult` with one :class:`Row` per
model measured), and the checks and measurements every method shares.

A row measures each model the same way: test accuracy per task, parameters, MACs per
input (all tasks answered; a multiplexer's average as routed on the test split) and the
bytes of the ``.nnc`` file ``nc.save`` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nncompress.data import Dataset, example_input, require_labels
from nncompress.errors import ModelError
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params
from nncompress.share.composite import BranchesModel
from nncompress.share.zipped import ZippedPair

__all__ = ["MultiInputs", "MultiResult", "Row", "check_fits", "check_labelled", "measure_row",
           "model_output", "task_outputs"]


@dataclass(frozen=True)
class MultiInputs:
    """What a multi-model method works on.

    ``names`` say how each model was given (for tables and messages). ``tasks``: one
    dataset per model for ``zip``, one per head for ``branches``, the one task for a
    multiplexer. ``calibration``: held-out ``(x, y)`` batches the models did not train on
    (cascade, router). ``classes[t]``: the classes of the backbone's dataset that task
    ``t`` holds (``branches``; ``None``: a dataset of its own).
    """

    models: tuple[nn.Module, ...]
    names: tuple[str, ...]
    tasks: tuple[Dataset, ...]
    calibration: Iterable[Any] | None = None
    classes: tuple[tuple[int, ...] | None, ...] = ()
    seed: int = 0
    progress: bool = False


@dataclass(frozen=True)
class Row:
    """One model's figures: test accuracy per task (``None``: not measurable), parameters,
    MACs per input (all tasks answered; a multiplexer's average on the test split) and the
    bytes of its ``.nnc`` file."""

    label: str
    accuracy: tuple[float | None, ...]
    params: int
    macs: float
    file_bytes: int


@dataclass(frozen=True)
class MultiResult:
    """The result model (one ``.nnc`` file), its task names, the rows (the inputs first,
    the result last), one-line notes, and JSON-able facts for the file's metadata."""

    model: nn.Module
    tasks: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)


def task_outputs(model: nn.Module) -> list[nn.Module]:
    """One single-output module per task of a result model, in task order (a multiplexer
    answers one task)."""
    if isinstance(model, ZippedPair):
        return [model.task(0), model.task(1)]
    if isinstance(model, BranchesModel):
        return [model.branch(t) for t in range(len(model.heads))]
    return [model]


def measure_row(label: str, model: nn.Module, tasks: Sequence[Dataset], *,
         macs: float | None = None) -> Row:
    views = task_outputs(model)
    accs = tuple(accuracy(v, t.test) for v, t in zip(views, tasks, strict=True))
    if macs is None:
        macs = count_macs(model, example_input(tasks[0], 1)).total
    return Row(label, accs, count_params(model).total, float(macs), artifact_bytes(model))


def model_output(model: nn.Module, name: str, data: Dataset, what: str) -> Any:
    """``model`` on two of ``data``'s test inputs; a failure is a ModelError naming both."""
    try:
        with torch.no_grad():
            return model.eval()(example_input(data, 2))
    except Exception as exc:
        raise ModelError(f"{what}: model {name!r} does not take {data.name!r}'s inputs "
                         f"shaped {data.input_shape}: {type(exc).__name__}: "
                         f"{str(exc)[:160]}") from None


def check_labelled(inputs: MultiInputs, what: str) -> None:
    """Every task has labels (each method trains or calibrates on them and reports
    accuracy per task); else a one-line DataError, before any model is touched."""
    for data in inputs.tasks:
        require_labels(data, f"{what} (a method over classes)")


def check_fits(inputs: MultiInputs, what: str, *, same_classes: bool) -> None:
    """Each model runs on its task's inputs (``same_classes``: one task for all) and gives
    one logit per class; else ModelError naming the model and the data."""
    for i, (model, name) in enumerate(zip(inputs.models, inputs.names, strict=True)):
        data = inputs.tasks[0] if same_classes else inputs.tasks[i]
        out = model_output(model, name, data, what)
        if not (isinstance(out, torch.Tensor) and out.shape == (2, data.num_classes)):
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out)
            raise ModelError(f"{what}: model {name!r} gives outputs shaped {shape} per "
                             f"sample; {data.name!r} has {data.num_classes} classes")
