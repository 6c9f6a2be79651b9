"""Bench section: mixed precision (HAWQ) vs uniform weight widths at equal bytes (issue 9).

Dong, Yao, Gholami, Mahoney & Keutzer (2019), "HAWQ: Hessian AWare Quantization of neural
networks with mixed-precision" (HAWQ-V2's Hutchinson trace measure, HAWQ-V3's objective):
``mixed_precision`` (:mod:`nncompress.quant.mixed`) picks each Linear / Conv layer's weight
width from {2, 3, 4, 6, 8} to minimise ``sum Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2`` under a
budget of weight-code bytes; uniform rows are the ``lowbit`` technique with every one of
those layers (first and last included) at one width, and one row is ``lowbit``'s default
heuristic (first and last layer at 8 bits, the rest at :data:`PINNED_BITS`). The budget of
each mixed row is the predicted code bytes of the row it faces (same cost model: the codes
in their smallest lossless encoding), so both store about the same bytes; the table shows
what each really stores. Weights only (inputs stay float), linear (LSQ) quantizer; every row starts
from the same cached trained model and gets the same short fine-tuning (:data:`EPOCHS`
epoch(s) at lr :data:`LR` on :data:`TRAIN_SAMPLES` training samples); each configuration
runs with every seed in :data:`SEEDS` (the seed orders the fine-tuning batches and draws
the Hutchinson vectors). Accuracy: top-1 on the test split.

Usage: ``python -c "import sys; sys.path.insert(0, 'bench'); import mixed;
print(mixed.section())"`` (``section(out_dir)`` also writes the Pareto plot there).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lowbit import train_subset
from nncompress import models as zoo
from nncompress.measure import accuracy
from nncompress.quant.mixed import MixedPrecisionConfig
from nncompress.quant.mixed_pareto import Point, pareto, uniform_bytes
from nncompress.report import fmt_bytes, fmt_pct, render_markdown
from nncompress.report.pareto import PARETO_PNG, plot_pareto, widths_label

__all__ = ["section"]

MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"))
BITS = (3, 4)             # uniform widths, each faced by mixed precision at its bytes
PINNED_BITS = 3           # the lowbit default (first / last layer at 8 bits) at this width
SEEDS = (0, 1)
EPOCHS = 1
LR = 5e-4
TRAIN_SAMPLES = 1024
MODEL_SEED = 0


def _config(pinned: bool = False) -> MixedPrecisionConfig:
    return MixedPrecisionConfig(budget_ratio=1.0, epochs=EPOCHS, lr=LR, keep_first=pinned,
                                keep_last=pinned)


#: (baseline points, mixed points), one point per seed each
Pair = tuple[list[Point], list[Point]]


def measure(name: str, dataset: str, seeds: Sequence[int] = SEEDS,
            echo: Callable[[str], None] | None = None) -> tuple[float, list[Pair]]:
    """(fp32 test accuracy, per baseline -- uniform at each of :data:`BITS`, then uniform
    :data:`PINNED_BITS` with the first and last layer at 8 bits -- its points and those of
    mixed precision at its predicted bytes, one per seed)."""
    model, data = zoo.load(name, dataset, seed=MODEL_SEED, progress=False)
    short = train_subset(data, TRAIN_SAMPLES, MODEL_SEED)
    budgets = [uniform_bytes(model, short, b, _config()) for b in BITS]
    budgets.append(uniform_bytes(model, short, PINNED_BITS, _config(pinned=True)))
    runs = []
    for seed in seeds:
        if echo is not None:
            echo(f"  mixed precision: {name} seed {seed}")
        found = pareto(model, short, budgets, uniform=BITS, config=_config(), seed=seed)
        found += pareto(model, short, [], uniform=[PINNED_BITS], config=_config(pinned=True),
                        seed=seed)
        runs.append(found)
    n = len(BITS)
    order = [(i, n + i) for i in range(n)] + [(2 * n + 1, 2 * n)]
    return accuracy(model, data.test), [([r[u] for r in runs], [r[m] for r in runs])
                                        for u, m in order]


def _cells(name: str, base: float, pairs: list[Pair]) -> list[list[str]]:
    """Per baseline: its row, then the mixed row at its bytes."""
    cells = []
    for baseline, mixed in pairs:
        reference = statistics.fmean(p.accuracy for p in baseline)
        for points in (baseline, mixed):
            first = points[0]
            mean = statistics.fmean(p.accuracy for p in points)
            cells.append([
                name, "mixed (HAWQ)" if first.kind == "mixed" else first.label,
                " | ".join(dict.fromkeys(widths_label(p) for p in points)),
                fmt_bytes(first.budget) if first.budget else "-",
                fmt_bytes(max(p.code_bytes for p in points)),
                fmt_bytes(max(p.bytes for p in points)),
                ", ".join(fmt_pct(p.accuracy) for p in points), fmt_pct(mean),
                fmt_pct(mean - base, signed=True),
                fmt_pct(mean - reference, signed=True) if first.kind == "mixed" else "-"])
    return cells


HEADERS = ["model", "configuration", "bits per layer", "budget (codes)", "codes stored",
           ".nnc file", "accuracy per seed", "mean", "Δ vs fp32", "Δ vs the row above"]
MIXED_INTRO = (
    "HAWQ (Dong, Yao, Gholami, Mahoney & Keutzer 2019; HAWQ-V2's Hutchinson-trace measure, "
    "HAWQ-V3's objective): `mixed_precision` picks each Linear / Conv layer's weight width "
    "from {2, 3, 4, 6, 8} minimising the sum over layers of Tr(H)/n x ||Q_b(W) - W||^2 "
    f"(Hessian trace from {_config().samples} Rademacher vectors on each of "
    f"{_config().batches} training batches) under a "
    "budget of weight-code bytes, solved exactly. Each mixed row's budget is the predicted "
    "code bytes of the row above it (same cost model: the initial codes in their smallest "
    "lossless encoding): uniform b-bit = every Linear / Conv layer at b bits; \"first/last "
    "8-bit\" = the `lowbit` default (first and last layer at 8 bits, the rest at b). "
    f"Weights only (inputs stay float), linear (LSQ) quantizer; every row starts from the "
    f"same cached trained model and gets the same fine-tuning ({EPOCHS} epoch at lr {LR} on "
    f"{TRAIN_SAMPLES} training samples); each runs with seeds {', '.join(map(str, SEEDS))} "
    "(the seed orders the fine-tuning batches and draws the Hutchinson vectors). Bits per "
    "layer in module order (one entry per seed when the seeds chose differently); codes "
    "stored / .nnc file: bytes on disk (largest over seeds); accuracy: top-1 on the test "
    "split; Δ vs the row above: mean accuracy of mixed minus that of the row it faces.")


def section(out_dir: Path | None = None, *, seeds: Sequence[int] = SEEDS,
            echo: Callable[[str], None] | None = None) -> str:
    """The Markdown section: one table (uniform vs mixed at equal bytes, per model and
    width), then, with ``out_dir``, the accuracy-vs-bytes plot of the first seed written
    there (:data:`~nncompress.report.pareto.PARETO_PNG`) and linked as ``out_dir/name``
    (relative to where the Markdown file lives when ``out_dir`` is relative)."""
    start = time.perf_counter()
    cells: list[list[str]] = []
    curves: dict[str, list[Point]] = {}
    fp32: list[str] = []
    for name, dataset in MODELS:
        base, pairs = measure(name, dataset, seeds, echo)
        cells += _cells(name, base, pairs)
        curves[f"{name} ({dataset})"] = [p for pair in pairs for points in pair
                                          for p in points[:1]]
        fp32.append(f"{name} {fmt_pct(base)}")
    parts = ["## Mixed precision (HAWQ) vs uniform widths at equal bytes", "", MIXED_INTRO, "",
             f"fp32 test accuracy: {', '.join(fp32)}.", "",
             render_markdown(HEADERS, cells), ""]
    if out_dir is not None:
        plot = plot_pareto(curves, Path(out_dir) / PARETO_PNG,
                           f"Mixed precision vs uniform widths (seed {seeds[0]})")
        parts += [f"![mixed precision vs uniform]({Path(out_dir) / plot.name})", ""]
    parts.append(f"Section run time: {time.perf_counter() - start:.0f} s.")
    return "\n".join(parts)
