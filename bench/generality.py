"""Bench section: every technique on every architecture -- the zoo and plain PyTorch models.

Each cell compresses one trained model with one technique (a short recipe: the point is
coverage, not the best numbers) and checks what a user would: the compressed model runs,
saves to a ``.nnc`` and loads back with the same outputs (reference models rebuild from
their record; plain ones load into a freshly built instance, ``nc.load(path,
skeleton=...)``). A cell is

- ``works``: test accuracy before -> after and the ``.nnc`` size ratio;
- ``refused``: the technique declined the model before touching it, with a one-line
  error naming the layer (the message is listed under the table);
- ``BROKEN``: anything else -- an internal error, or a model that no longer runs or does
  not round-trip. The target is no BROKEN cell.

Training in the cells uses ``TRAIN_SAMPLES`` training samples and one epoch per training
step, so the whole table runs in minutes; accuracies after such short schedules are lower
than the tuned recipes' (see the other sections for those).

Usage alone: ``python bench/generality.py [arch ...]``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nncompress as nc
from nncompress import inputs
from nncompress import models as zoo
from nncompress.data import Dataset, example_input, holdout
from nncompress.errors import NNCError
from nncompress.measure import accuracy
from nncompress.models.plain import PLAIN, load_plain
from nncompress.recipe import Recipe, Stage
from nncompress.report import fmt_pct, fmt_ratio, render_markdown

SEED = 0
TRAIN_SAMPLES = 1000
ZOO = ("mlp", "cnn1d", "gru", "lstm", "cnn2d", "rescnn", "transformer")

T = Stage.technique
#: technique -> the stages of its cell (one epoch per training step)
CELLS: dict[str, tuple[Stage, ...]] = {
    "magnitude_prune": (T("magnitude_prune", sparsity=0.7, scope="global", steps=2,
                          epochs_per_step=1, lr=1e-3),),
    "dynamic_surgery": (T("dynamic_surgery", sparsity=0.7, epochs=1),),
    "sparse_vd": (T("sparse_vd", epochs=2, lr=1e-3),),
    "l1_filter_prune": (T("l1_filter_prune", ratio=0.3, epochs_per_step=1),),
    "network_slimming": (T("network_slimming", ratio=0.3, epochs=1, epochs_after=1),),
    "channel_lasso": (T("channel_lasso", ratio=0.3, samples=400, batches=2, epochs=1),),
    "thinet": (T("thinet", ratio=0.3, samples=400, batches=2, epochs=1),),
    "low_rank": (T("low_rank", energy=0.9, epochs=1),),
    "layer_prune": (T("layer_prune", count=1, epochs=1),),
    "weight_sharing": (T("weight_sharing", bits=4, epochs=1),),
    "hashed_net": (T("hashed_net", compression=4.0, epochs=1),),
    "fold_batchnorm": (T("fold_batchnorm"),),
    "dead_units": (T("magnitude_prune", sparsity=0.7, scope="global", steps=1,
                     epochs_per_step=1, lr=1e-3), T("dead_units")),
    "quantize_int8": (T("quantize_int8", calibration_batches=2),),
    "qat_int8": (T("qat_int8", epochs=1, calibration_batches=2),),
    "lowbit": (T("lowbit", weight_bits=4, epochs=1),),
    "mixed_precision": (T("mixed_precision", average_bits=4.0, epochs=1),),
    "binarize": (T("binarize", activations=False, epochs=1),),
    "kd_student": (T("kd_student", size_ratio=3.0, epochs=30),),
    "fskd": (T("l1_filter_prune", ratio=0.3, epochs_per_step=0), T("fskd")),
    "cs_kd": (T("cs_kd", epochs=1),),
}

GENERALITY_INTRO = f"""## Every technique on every architecture

The reference models and plain PyTorch models nncompress was not written around
(`nncompress.models.plain`: {', '.join(f'`{n}` ({s.description})' for n, s in PLAIN.items())}).
Each cell: one short recipe on the trained model (training steps use {TRAIN_SAMPLES}
training samples and one epoch, so accuracies are below the tuned recipes'), then the
compressed model must run, save to `.nnc` and load back with the same outputs. `works`:
test accuracy before -> after, `.nnc` size ratio; `refused`: the technique declined before
touching the model, with a one-line error naming the layer (listed below the table);
`BROKEN`: an internal error or a model that no longer runs or round-trips (target: none).
`dead_units` runs after 70 % global magnitude pruning with one epoch of fine-tuning;
`fskd` after 30 % L1 filter pruning without fine-tuning. `kd_student` builds a 3x smaller
student: width rules for the reference models, the narrowed structured-pruning groups for
the plain ones (`models/narrowed.py`)."""


@dataclass(frozen=True)
class Cell:
    arch: str
    technique: str
    status: str  # works | refused | BROKEN
    detail: str
    seconds: float


def _subset(data: Dataset) -> Dataset:
    fraction = 1.0 - TRAIN_SAMPLES / len(data.train.dataset)
    return holdout(data, fraction, seed=SEED)[0] if fraction > 0 else data


def _models() -> dict[str, tuple[nn.Module, Dataset, Callable[[], nn.Module] | None]]:
    out = {}
    for name in ZOO:
        model, data = zoo.load(name, seed=SEED, progress=False)
        out[name] = (model, data, None)
    for name, spec in PLAIN.items():
        model, data = load_plain(name, seed=SEED)
        out[name] = (model, data, spec.build)
    return out


def _round_trip(model: nn.Module, skeleton: Callable[[], nn.Module] | None, x,
                tmp: Path) -> str | None:
    """None if the model runs and reloads with the same outputs, else what failed."""
    path = tmp / "cell.nnc"
    nc.save(model, path)
    # a result with its own builder (e.g. an int8 program) rebuilds without the skeleton
    own = isinstance(getattr(type(model), "arch_name", None), str)
    loaded = nc.load(path, skeleton=skeleton()) if skeleton and not own else nc.load(path)
    with torch.no_grad():
        a, b = inputs.call(model.eval(), x), inputs.call(loaded.eval(), x)
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        return f"reloaded outputs differ (max |diff| {float((a - b).abs().max()):.3g})"
    return None


def run_cell(arch: str, technique: str, model: nn.Module, data: Dataset,
             skeleton: Callable[[], nn.Module] | None, tmp: Path) -> Cell:
    start = time.perf_counter()
    recipe = Recipe(f"cell-{technique}", CELLS[technique])
    before = accuracy(model, data.test)
    try:
        result = nc.compress(copy.deepcopy(model), recipe, _subset(data), seed=SEED,
                             progress=False, measure_latency=False)
    except NNCError as exc:
        return Cell(arch, technique, "refused", str(exc), time.perf_counter() - start)
    except Exception as exc:  # a bug: reported as BROKEN, not hidden
        return Cell(arch, technique, "BROKEN", f"{type(exc).__name__}: {exc}"[:300],
                    time.perf_counter() - start)
    try:
        problem = _round_trip(result.model, skeleton, example_input(data, 4), tmp)
    except Exception as exc:  # a bug: reported as BROKEN, not hidden
        problem = f"{type(exc).__name__}: {exc}"[:300]
    if problem:
        return Cell(arch, technique, "BROKEN", problem, time.perf_counter() - start)
    after = result.final.accuracy
    ratio = result.baseline.artifact_bytes / result.final.artifact_bytes
    return Cell(arch, technique, "works",
                f"{fmt_pct(before)} -> {fmt_pct(after)}, {fmt_ratio(ratio)}",
                time.perf_counter() - start)


def bench_generality(echo: Callable[[str], None], archs: tuple[str, ...] | None = None
                     ) -> list[Cell]:
    found = _models()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs or tuple(found):
            model, data, skeleton = found[arch]
            for technique in CELLS:
                cell = run_cell(arch, technique, model, data, skeleton, Path(tmp))
                echo(f"  {arch} / {technique}: {cell.status} ({cell.seconds:.0f} s) "
                     f"{cell.detail[:120]}")
                cells.append(cell)
    return cells


def generality_markdown(cells: list[Cell]) -> str:
    archs = list(dict.fromkeys(c.arch for c in cells))
    grid = {(c.arch, c.technique): c for c in cells}
    refusals: dict[str, list[str]] = {}
    rows = []
    for technique in CELLS:
        row = [f"`{technique}`"]
        for arch in archs:
            c = grid.get((arch, technique))
            if c is None:
                row.append("")
            elif c.status == "works":
                row.append(c.detail)
            else:
                key = f"{c.status}: {c.detail}"
                refusals.setdefault(key, []).append(f"{arch}/{technique}")
                row.append(f"{c.status} [{list(refusals).index(key) + 1}]")
        rows.append(row)
    counts = {s: sum(c.status == s for c in cells) for s in ("works", "refused", "BROKEN")}
    notes = [f"{i}. {key} ({', '.join(where)})"
             for i, (key, where) in enumerate(refusals.items(), 1)]
    return "\n".join([render_markdown(["technique", *archs], rows), "",
                      f"{counts['works']} cells work, {counts['refused']} refused, "
                      f"{counts['BROKEN']} broken.", "", *notes])


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = bench_generality(lambda m: print(m, file=sys.stderr, flush=True),
                              tuple(sys.argv[1:]) or None)
    print(generality_markdown(result))
