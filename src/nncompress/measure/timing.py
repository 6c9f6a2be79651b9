"""Wall-clock latency of a forward pass on CPU, per batch size.

Method: eval mode, ``torch.inference_mode``, a fixed input -- a seeded random
``[batch, *input_shape]`` tensor, or real samples (``example=``, any dtype or a tuple /
dict of tensors, repeated to the batch size) -- ``warmup`` untimed calls, then ``repeats``
calls each timed with ``time.perf_counter``; the median and 10th/90th percentiles are
reported in milliseconds per call (per batch, not per sample), with the intra-op thread
count used.

:func:`latency_ab` times several models *interleaved*: round after round, each model in
turn (the order rotating) gets ``repeats`` timed calls, so slow drifts of a shared machine
hit every model alike and a ratio of two medians has the sign an A/B test gives.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nncompress import inputs
from nncompress.inputs import Inputs
from nncompress.measure._common import call_model, eval_mode, first_param

__all__ = ["BatchLatency", "LatencyReport", "latency", "latency_ab"]


@dataclass(frozen=True)
class BatchLatency:
    """Milliseconds per forward call of a whole batch of ``batch`` samples."""

    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


class CallableModule(nn.Module):
    """Any callable (e.g. a deployed form's ``predict``) as a module, so :func:`latency` /
    :func:`latency_ab` time it beside ordinary modules."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Any) -> Any:
        return self.fn(x)


@dataclass(frozen=True)
class LatencyReport:
    """Latency per batch size, measured with ``threads`` torch intra-op threads."""

    threads: int
    results: tuple[BatchLatency, ...]


def _check(batch_sizes: Sequence[int], warmup: int, repeats: int, threads: int | None) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def _random_input(model: nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard-normal input on the model's device, in its floating dtype (else fp32)."""
    p = first_param(model)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x if p is None else x.to(p.device)


def _time_calls(model: nn.Module, x: Inputs, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``model(x)`` after ``warmup`` untimed ones
    (eval mode set by the caller)."""
    with torch.inference_mode():
        for _ in range(warmup):
            call_model(model, x)
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, x)
            times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def _summary(batch: int, times_ms: list[float]) -> BatchLatency:
    p10, p90 = np.percentile(times_ms, [10, 90])
    return BatchLatency(batch=batch, median_ms=float(statistics.median(times_ms)),
                        p10_ms=float(p10), p90_ms=float(p90), repeats=len(times_ms))


def _batch_input(model: nn.Module, input_shape: Sequence[int] | None, example: Inputs | None,
                 batch: int, seed: int) -> Inputs:
    if example is not None:
        return inputs.repeat_to(example, batch)
    if input_shape is None:
        raise ValueError("latency needs input_shape or example")
    return _random_input(model, (batch, *input_shape), seed)


def latency(model: nn.Module, input_shape: Sequence[int] | None = None,
            batch_sizes: Sequence[int] = (1, 256), *, warmup: int = 5, repeats: int = 30,
            threads: int | None = None, seed: int = 0,
            example: Inputs | None = None) -> LatencyReport:
    """Median (and p10/p90) milliseconds per forward call for each batch size.

    ``input_shape`` is per sample (no batch dimension): inputs are seeded standard-normal.
    ``example``: real samples instead (any dtype, or a tuple / dict of tensors), repeated
    to each batch size. ``threads`` sets ``torch.set_num_threads`` for the measurement
    only; the previous count and every module's train/eval flag are restored afterwards.
    """
    return latency_ab([model], input_shape, batch_sizes, warmup=warmup, repeats=repeats,
                      rounds=1, threads=threads, seed=seed, example=example)[0]


def latency_ab(models: Sequence[nn.Module], input_shape: Sequence[int] | None = None,
               batch_sizes: Sequence[int] = (1, 256), *, warmup: int = 5, repeats: int = 30,
               rounds: int = 5, threads: int | None = None, seed: int = 0,
               example: Inputs | None = None) -> tuple[LatencyReport, ...]:
    """:func:`latency` of several models measured interleaved: ``rounds`` rounds, in each
    every model (in a rotating order) gets ``ceil(repeats / rounds)`` timed calls after
    ``warmup`` untimed ones; each model's median is over all its calls. One report per
    model, in order."""
    _check(batch_sizes, warmup, repeats, threads)
    if not models or rounds < 1:
        raise ValueError(f"need at least one model and rounds >= 1, got {len(models)} and "
                         f"{rounds}")
    per_round = -(-repeats // rounds)
    previous = torch.get_num_threads()
    times: list[dict[int, list[float]]] = [{} for _ in models]
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used = torch.get_num_threads()
        for b in batch_sizes:
            xs = [_batch_input(m, input_shape, example, int(b), seed) for m in models]
            for r in range(rounds):
                for k in range(len(models)):
                    i = (k + r) % len(models)
                    with eval_mode(models[i]):
                        got = _time_calls(models[i], xs[i], warmup, per_round)
                    times[i].setdefault(int(b), []).extend(got)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    return tuple(LatencyReport(threads=used, results=tuple(
        _summary(int(b), t[int(b)]) for b in batch_sizes)) for t in times)
