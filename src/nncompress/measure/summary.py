"""One :class:`Measurement` of a model on a dataset, and the :class:`Comparison` of two."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from nncompress import formats
from nncompress.data import Dataset, example_input
from nncompress.measure.macs import MacCount, count_macs
from nncompress.measure.params import ParamCount, count_params
from nncompress.measure.quality import check_metric, default_metric, quality
from nncompress.measure.size import TensorBytes, artifact_bytes, torch_save_bytes, weight_bytes
from nncompress.measure.timing import LatencyReport, latency_ab

__all__ = ["Comparison", "Measurement", "compare", "measure"]


@dataclass(frozen=True)
class Measurement:
    """Everything measured about one model.

    ``accuracy``: the value of the quality ``metric`` on the test split -- top-1 accuracy
    (a fraction in [0, 1]) unless another metric of :mod:`nncompress.measure.quality` was
    asked for (e.g. ``"cosine"`` to the teacher's outputs). ``params``: element counts.
    ``macs``: per sample. ``artifact_bytes``: the .nnc file; ``torch_save_bytes``:
    ``torch.save(state_dict)``. ``latency``: ms per batch call, or None when skipped.
    ``weights``: each weight tensor's bytes, plain and entropy-coded (:func:`weight_bytes`).
    ``reference_latency``: the latency of a reference model (the uncompressed baseline)
    timed interleaved with this one, round by round (``measure(..., reference=)``);
    :func:`compare` prefers it to the baseline's own, separately timed latency.
    """

    accuracy: float
    params: ParamCount
    macs: MacCount
    artifact_bytes: int
    torch_save_bytes: int
    latency: LatencyReport | None
    weights: tuple[TensorBytes, ...] = ()
    reference_latency: LatencyReport | None = None
    metric: str = "accuracy"

    @property
    def quality(self) -> float:
        """The value of :attr:`metric` (the same number as :attr:`accuracy`)."""
        return self.accuracy


def measure(model: nn.Module, data: Dataset, *, latency_batches: Sequence[int] = (1, 256),
            warmup: int = 5, repeats: int = 30, with_latency: bool = True,
            threads: int | None = None, reference: nn.Module | None = None,
            rounds: int = 5, metric: str | None = None,
            teacher: nn.Module | None = None) -> Measurement:
    """Measure ``model`` on ``data``: test quality, parameters, MACs (on one real test
    sample), bytes on disk, and (unless ``with_latency`` is False) latency per batch size
    in ``latency_batches`` on real test samples (repeated to the batch size).

    ``metric``: a name of :data:`~nncompress.measure.quality.METRICS` (default: accuracy
    for labelled data, top-1 agreement with ``teacher`` for inputs only); ``teacher``: the
    model whose outputs teacher-based metrics compare with (e.g. the uncompressed one;
    without one, ``model`` itself, which scores perfectly).

    ``reference``: another model (e.g. the uncompressed one) timed interleaved with
    ``model`` in ``rounds`` alternating rounds; its latency goes to ``reference_latency``.
    """
    report = ref_report = None
    if with_latency:
        models = [model] if reference is None else [model, reference]
        reports = latency_ab(models, None, latency_batches, warmup=warmup, repeats=repeats,
                             rounds=rounds if reference is not None else 1, threads=threads,
                             example=example_input(data, 1))
        report = reports[0]
        ref_report = reports[1] if reference is not None else None
    name = metric or default_metric(data.labelled)
    check_metric(name, labelled=data.labelled, has_teacher=True)
    # sizes and parameters are those of the model as saved (sparsify's CSR layers count
    # as the dense layers they stand for); quality and latency are the model's as it runs
    stored = formats.stored_form(model)
    weights = weight_bytes(stored)
    # the file stores each weight in the encoding weight_bytes found smallest (the same
    # choice save makes on its own), so the weights are not encoded every way twice
    chosen = {t.name: t.coded_encoding for t in weights}
    return Measurement(
        accuracy=quality(model, data.test, name, teacher=teacher or model),
        params=count_params(stored),
        macs=count_macs(model, example_input(data, 1)),
        artifact_bytes=artifact_bytes(stored, encodings=chosen),
        torch_save_bytes=torch_save_bytes(stored),
        latency=report,
        weights=weights,
        reference_latency=ref_report,
        metric=name,
    )


@dataclass(frozen=True)
class Comparison:
    """``after`` relative to ``before``; every ratio is before / after, so > 1 means
    "after is smaller / faster".

    ``accuracy_delta``: after - before, as a fraction (-0.01 = one point lost).
    ``size_ratio``: .nnc bytes. ``torch_save_ratio``: before's ``torch.save`` bytes over
    after's .nnc bytes (the saving against the usual way of storing a model).
    ``params_ratio`` / ``nonzero_ratio``: parameter elements, all / non-zero.
    ``macs_ratio`` / ``sparse_macs_ratio``: per-sample MACs, dense / non-zero weights only.
    ``speedup``: ``(batch, before median ms / after median ms)`` for every batch size both
    measured (empty when either skipped latency); "before" is ``after.reference_latency``
    when ``after`` was timed interleaved with its reference, else ``before.latency``.
    """

    accuracy_delta: float
    size_ratio: float
    torch_save_ratio: float
    params_ratio: float
    nonzero_ratio: float
    macs_ratio: float
    sparse_macs_ratio: float
    speedup: tuple[tuple[int, float], ...]


def _ratio(before: float, after: float) -> float:
    """``before / after``; inf when only ``after`` is 0, nan when both are."""
    if after == 0:
        return math.inf if before > 0 else math.nan
    return before / after


def _speedup(before: LatencyReport | None,
             after: LatencyReport | None) -> tuple[tuple[int, float], ...]:
    if before is None or after is None:
        return ()
    after_ms = {r.batch: r.median_ms for r in after.results}
    return tuple((r.batch, _ratio(r.median_ms, after_ms[r.batch]))
                 for r in before.results if r.batch in after_ms)


def compare(before: Measurement, after: Measurement) -> Comparison:
    """How ``after`` compares with ``before`` (see :class:`Comparison` for each field)."""
    return Comparison(
        accuracy_delta=after.accuracy - before.accuracy,
        size_ratio=_ratio(before.artifact_bytes, after.artifact_bytes),
        torch_save_ratio=_ratio(before.torch_save_bytes, after.artifact_bytes),
        params_ratio=_ratio(before.params.total, after.params.total),
        nonzero_ratio=_ratio(before.params.nonzero, after.params.nonzero),
        macs_ratio=_ratio(before.macs.total, after.macs.total),
        sparse_macs_ratio=_ratio(before.macs.sparse_total, after.macs.sparse_total),
        speedup=_speedup(after.reference_latency or before.latency, after.latency),
    )
