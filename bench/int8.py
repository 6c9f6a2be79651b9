"""Bench section: int8 on the seven reference models, ours beside the peer int8 tools.

Integer-arithmetic-only int8 is Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018). The peers (fp32
eager torch, ONNX Runtime fp32 / dynamic int8 / static QDQ int8, PyTorch dynamic int8) are
built in :mod:`int8_peers`. Every artifact of one model is timed *interleaved*: in each of
``TIMING``'s rounds every artifact, in a rotating order, gets its warm-up and timed calls
(``nncompress.measure.timing.latency_ab`` over thin wrappers of the ``predict``
callables), and the median per artifact is reported, at batch 1 and 256, with ``THREADS``
intra-op threads for torch and ONNX Runtime alike.

``section(ours=...)`` takes the int8 engineer's builder ``(name, model, data) -> Artifact``
and checks issue 9's targets against it: accuracy drop <= 0.5 pt (PTQ), ``.nnc`` >= 3.8x
smaller than the fp32 ``torch.save`` file, batch 1 at least as fast as the fastest peer
int8 and never slower than fp32 eager torch.

Usage: ``python -c "import sys; sys.path.insert(0, 'bench'); import int8; print(int8.section())"``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from int8_peers import THREADS, Artifact, Predict, peer_artifacts
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.measure.timing import CallableModule, latency_ab
from nncompress.report import fmt_bytes, fmt_ms, fmt_pct, fmt_ratio, render_markdown
from peers import try_peer

__all__ = ["Int8Row", "Verdict", "intro", "measure_artifacts", "peer_artifacts", "section",
           "verdict"]

SEED = 0
MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"), ("cnn2d", "digits"), ("rescnn", "mnist1d"),
          ("gru", "mnist1d"), ("lstm", "mnist1d"), ("transformer", "mnist1d"))
CALIB_BATCHES = 4          # x 64 = 256 seeded training samples
# batch -> (alternating rounds, warm-up calls per round, timed calls in all)
TIMING = {1: (10, 5, 200), 256: (6, 1, 18)}
MAX_DROP = 0.005
MIN_RATIO = 3.8

Ours = Callable[[str, nn.Module, Dataset], Artifact]


def intro(threads: int = THREADS) -> str:
    """The section's heading and method paragraph."""
    return f"""## int8 (integer-only, Jacob et al. 2018) beside the peer int8 tools

Each reference model as its user would ship it: fp32 eager torch (`torch.save` of the
state dict), ONNX Runtime fp32 (`torch.onnx.export`, TorchScript exporter), ONNX Runtime
dynamic int8 (`quantize_dynamic`, int8 weights), ONNX Runtime static int8 (`quantize_static`,
QDQ, per-channel int8 weights, int8 activations, MinMax over {CALIB_BATCHES * 64} seeded
training samples, after `quant_pre_process`) and PyTorch dynamic int8
(`torch.ao.quantization.quantize_dynamic` on Linear/GRU/LSTM). Bytes: the shipped file;
ratio = fp32 `torch.save` bytes / bytes. Accuracy: top-1 on the test split. Latency:
median ms per call of a real test batch (repeated to 256), all artifacts of a model
interleaved in alternating rounds ({TIMING[1][2]} timed calls over {TIMING[1][0]} rounds at
batch 1, {TIMING[256][2]} over {TIMING[256][0]} at batch 256), {threads} intra-op threads for
torch and ONNX Runtime alike. Speed-up = the baseline's median / the artifact's median.
Notes name every layer a peer leaves in fp32."""


@dataclass(frozen=True)
class Int8Row:
    """One artifact of one model, measured. Accuracies are fractions; ``accuracy_delta``
    is against fp32 eager torch; ``ratio`` = fp32 ``torch.save`` bytes / ``file_bytes``;
    latencies in ms per call; ``*_vs_eager`` / ``*_vs_ort``: speed-ups (>1 = faster) vs
    fp32 eager torch / ONNX Runtime fp32. Numbers are None for a failed artifact."""

    name: str
    kind: str
    accuracy: float | None
    accuracy_delta: float | None
    file_bytes: int | None
    ratio: float | None
    b1_ms: float | None
    b256_ms: float | None
    b1_vs_eager: float | None
    b256_vs_eager: float | None
    b1_vs_ort: float | None
    b256_vs_ort: float | None
    notes: str
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """Issue 9's int8 targets for our row of one model. ``peer_ratio`` = fastest peer
    int8's batch-1 median / ours (>= 1: ours at least as fast); ``fp32_ratio`` likewise
    against fp32 eager torch; ``ort_ratio`` against ONNX Runtime fp32 (shown, not a
    target)."""

    accuracy_delta: float
    ratio: float
    fastest_peer: str | None
    peer_ratio: float | None
    fp32_ratio: float
    ort_ratio: float | None
    max_drop: float = MAX_DROP

    @property
    def checks(self) -> dict[str, bool]:
        return {"accuracy": self.accuracy_delta >= -self.max_drop - 1e-9,
                "size": self.ratio >= MIN_RATIO,
                "vs peers": self.peer_ratio is None or self.peer_ratio >= 1.0,
                "vs fp32": self.fp32_ratio >= 1.0}

    @property
    def met(self) -> bool:
        return all(self.checks.values())


def _accuracy(predict: Predict, data: Dataset) -> float:
    correct = seen = 0
    for x, y in data.test:
        correct += int((np.asarray(predict(x)).argmax(1) == y.numpy()).sum())
        seen += len(y)
    return correct / seen


def _latencies(predicts: list[Predict], data: Dataset, threads: int) -> dict[int, list[float]]:
    """Batch -> medians (ms) of every predictor, timed interleaved on real test samples."""
    mods = [CallableModule(p) for p in predicts]
    example = example_input(data, 1)
    out: dict[int, list[float]] = {}
    for batch, (rounds, warmup, repeats) in TIMING.items():
        reports = latency_ab(mods, batch_sizes=(batch,), warmup=warmup, repeats=repeats,
                             rounds=rounds, threads=threads, seed=SEED, example=example)
        out[batch] = [r.results[0].median_ms for r in reports]
    return out


def _speedup(base: float | None, mine: float | None) -> float | None:
    return None if base is None or mine is None else base / mine


def _smoke(artifact: Artifact, data: Dataset) -> Artifact:
    """``artifact``, or a failed one when its ``predict`` breaks on two test samples."""
    if artifact.predict is None:
        return artifact
    predict = artifact.predict
    _, err = try_peer(lambda: np.asarray(predict(example_input(data, 2))))
    return artifact if err is None else replace(artifact, predict=None, error=err)


def measure_artifacts(artifacts: Sequence[Artifact], data: Dataset, *,
                      threads: int = THREADS) -> list[Int8Row]:
    """Accuracy, bytes and interleaved batch-1 / batch-256 latency of every artifact of one
    model (one of kind ``"fp32"`` is the baseline; ``"ort-fp32"`` the second one). An
    artifact whose ``predict`` fails on two test samples becomes a failed row. Torch runs
    with ``threads`` intra-op threads while timed (the ORT sessions were built with theirs)."""
    arts = [_smoke(a, data) for a in artifacts]
    live = [i for i, a in enumerate(arts) if a.predict is not None]
    base = next((i for i in live if arts[i].kind == "fp32"), None)
    if base is None:
        raise ValueError("measure_artifacts needs a live artifact of kind 'fp32' (the baseline)")
    ort = next((i for i in live if arts[i].kind == "ort-fp32"), None)
    lat = _latencies([arts[i].predict for i in live], data, threads)  # type: ignore[misc]
    times = {i: (lat[1][k], lat[256][k]) for k, i in enumerate(live)}
    acc = {i: _accuracy(arts[i].predict, data) for i in live}  # type: ignore[arg-type]
    ort_t = times[ort] if ort is not None else (None, None)
    rows = []
    for i, a in enumerate(arts):
        if i not in times:
            rows.append(Int8Row(a.name, a.kind, None, None, None, None, None, None, None,
                                None, None, None, a.notes, a.error))
            continue
        b1, b256 = times[i]
        rows.append(Int8Row(
            a.name, a.kind, acc[i], acc[i] - acc[base], a.file_bytes,
            arts[base].file_bytes / a.file_bytes, b1, b256, _speedup(times[base][0], b1),
            _speedup(times[base][1], b256), _speedup(ort_t[0], b1), _speedup(ort_t[1], b256),
            a.notes, a.error))
    return rows


def verdict(rows: Sequence[Int8Row], name: str | None = None,
            max_drop: float = MAX_DROP) -> Verdict | None:
    """The targets for the ``"ours"`` row ``name`` (the first when None) of one model's rows
    (None without a live one); ``max_drop``: the accuracy budget in points."""
    ours = next((r for r in rows if r.kind == "ours" and r.b1_ms is not None
                 and name in (None, r.name)), None)
    if ours is None or ours.accuracy_delta is None or ours.ratio is None:
        return None
    peers = [r for r in rows if r.kind == "peer-int8" and r.b1_ms is not None]
    fastest = min(peers, key=lambda r: r.b1_ms or 0.0, default=None)
    base = next(r for r in rows if r.kind == "fp32")
    ort = next((r for r in rows if r.kind == "ort-fp32" and r.b1_ms is not None), None)
    return Verdict(ours.accuracy_delta, ours.ratio, fastest.name if fastest else None,
                   _speedup(fastest.b1_ms, ours.b1_ms) if fastest else None,
                   _speedup(base.b1_ms, ours.b1_ms) or 0.0,
                   _speedup(ort.b1_ms, ours.b1_ms) if ort else None, max_drop)


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None else f"{fmt_ratio(a)} / {fmt_ratio(b)}"


def rows_markdown(rows: Sequence[Int8Row], ours: bool = False) -> str:
    """One model's table; ``ours`` adds the batch-1 ratio to the fastest peer int8."""
    headers = ["artifact", "accuracy", "Δ accuracy", "bytes on disk", "ratio vs fp32",
               "latency b1", "latency b256", "speed-up vs fp32 eager (b1 / b256)",
               "speed-up vs ORT fp32 (b1 / b256)"]
    headers += ["ours vs fastest peer int8 (batch-1 ratio)"] if ours else []
    cells = []
    for r in rows:
        row = [r.name, fmt_pct(r.accuracy), fmt_pct(r.accuracy_delta, signed=True),
               fmt_bytes(r.file_bytes), fmt_ratio(r.ratio), fmt_ms(r.b1_ms), fmt_ms(r.b256_ms),
               _pair(r.b1_vs_eager, r.b256_vs_eager), _pair(r.b1_vs_ort, r.b256_vs_ort)]
        if ours:
            v = verdict(rows, r.name) if r.kind == "ours" else None
            row.append(fmt_ratio(v.peer_ratio) if v is not None else "-")
        cells.append(row)
    notes = [f"- {r.name}: " + (f"failed: {r.error}" if r.error else r.notes) for r in rows
             if r.error or r.notes]
    return "\n".join([render_markdown(headers, cells), "", *notes])


def verdicts_markdown(found: Sequence[tuple[str, Verdict | None]]) -> str:
    """The targets table: one line per model, each check marked yes / NO."""
    headers = ["model", "Δ accuracy (budget)", f"ratio vs fp32 (>= {MIN_RATIO}x)",
               "fastest peer int8 (b1)", "ours vs fastest peer int8 (b1, >= 1)",
               "ours vs fp32 eager (b1, >= 1)", "ours vs ORT fp32 (b1)", "targets met"]
    cells = []
    for name, v in found:
        if v is None:
            cells.append([name, "-", "-", "-", "-", "-", "-", "NO (ours failed)"])
            continue
        failed = [k for k, ok in v.checks.items() if not ok]
        cells.append([name, f"{fmt_pct(v.accuracy_delta, signed=True)} (<= "
                      f"{100 * v.max_drop:g} pt)",
                      fmt_ratio(v.ratio),
                      v.fastest_peer or "-", fmt_ratio(v.peer_ratio), fmt_ratio(v.fp32_ratio),
                      fmt_ratio(v.ort_ratio), "yes" if v.met else "NO: " + ", ".join(failed)])
    return render_markdown(headers, cells)


def _ours_artifact(ours: Ours, name: str, model: nn.Module, data: Dataset) -> Artifact:
    got, err = try_peer(lambda: ours(name, model, data))
    if got is None:
        return Artifact("nncompress int8 (.nnc)", None, 0, kind="ours", error=err)
    return replace(got, kind="ours")


def section(ours: Ours | Sequence[tuple[Ours, float]] | None = None,
            out_dir: Path | None = None, *,
            models: Sequence[tuple[str, str]] = MODELS,
            echo: Callable[[str], None] | None = None, threads: int = THREADS) -> str:
    """The markdown section: one table per reference model (peers, and ours when given),
    then, with ``ours``, the targets table. ``out_dir``: where the peers' files go (per
    model; a temporary directory when None). ``threads``: intra-op threads of every torch
    call and ORT session (``ours`` should build its sessions with ``int8_peers.THREADS``).
    ``ours``: one builder, or ``(builder, accuracy budget as a fraction)`` pairs (e.g.
    PTQ at 0.005 and QAT at 0.003), each an ``"ours"`` row and a line of the targets
    table."""
    builders = [] if ours is None else ([(ours, MAX_DROP)] if callable(ours) else list(ours))
    start, load = time.perf_counter(), os.getloadavg()[0]
    parts = [intro(threads), ""]
    found: list[tuple[str, Verdict | None]] = []
    for name, dataset in models:
        if echo is not None:
            echo(f"  int8 peers: {name}")
        model, data = zoo.load(name, dataset, seed=SEED, progress=False)
        sub = None if out_dir is None else Path(out_dir) / name
        arts = peer_artifacts(name, model, data, CALIB_BATCHES, out_dir=sub, seed=SEED,
                              threads=threads)
        mine = [(_ours_artifact(b, name, model, data), drop) for b, drop in builders]
        arts += [a for a, _ in mine]
        rows = measure_artifacts(arts, data, threads=threads)
        parts += [f"### {name} ({dataset})", "", rows_markdown(rows, bool(builders)), ""]
        found += [(f"{name}: {a.name}", verdict(rows, a.name, drop)) for a, drop in mine]
        if echo is not None:
            echo(f"  int8 peers: {name} done at {time.perf_counter() - start:.0f} s")
    if builders:
        parts += ["### Targets (issue 9, int8)", "", verdicts_markdown(found), ""]
    parts.append(f"Section run time: {time.perf_counter() - start:.0f} s; 1-minute load "
                 f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
                 f"{os.cpu_count()} CPUs (a load above the CPU count distorts the latencies, "
                 "multi-threaded torch's most).")
    return "\n".join(parts)
