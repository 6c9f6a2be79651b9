"""Wall-clock latency of a forward pass on CPU, per batch size.

Method: eval mode, ``torch.inference_mode``, a fixed random input ``[batch, *input_shape]``
(seeded), ``warmup`` untimed calls, then ``repeats`` calls each timed with
``time.perf_counter``; the median and 10th/90th percentiles are reported in milliseconds
per call (per batch, not per sample), with the intra-op thread count used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nncompress.measure._common import call_model, eval_mode, first_param

__all__ = ["BatchLatency", "LatencyReport", "latency"]


@dataclass(frozen=True)
class BatchLatency:
    """Milliseconds per forward call of a whole batch of ``batch`` samples."""

    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


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


def _time_batch(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> BatchLatency:
    """Time ``repeats`` calls of ``model(x)`` after ``warmup`` untimed ones (eval mode set)."""
    with torch.inference_mode():
        for _ in range(warmup):
            call_model(model, x)
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, x)
            times_ms.append((time.perf_counter() - start) * 1e3)
    p10, p90 = np.percentile(times_ms, [10, 90])
    return BatchLatency(batch=x.shape[0], median_ms=float(statistics.median(times_ms)),
                        p10_ms=float(p10), p90_ms=float(p90), repeats=repeats)


def latency(model: nn.Module, input_shape: Sequence[int],
            batch_sizes: Sequence[int] = (1, 256), *, warmup: int = 5, repeats: int = 30,
            threads: int | None = None, seed: int = 0) -> LatencyReport:
    """Median (and p10/p90) milliseconds per forward call for each batch size.

    ``input_shape`` is per sample (no batch dimension). ``threads`` sets
    ``torch.set_num_threads`` for the measurement only; the previous count and every
    module's train/eval flag are restored afterwards.
    """
    _check(batch_sizes, warmup, repeats, threads)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used = torch.get_num_threads()
        with eval_mode(model):
            results = tuple(
                _time_batch(model, _random_input(model, (int(b), *input_shape), seed),
                            warmup, repeats)
                for b in batch_sizes)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    return LatencyReport(threads=used, results=results)
