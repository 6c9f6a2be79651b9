"""Bench section: structured pruning at equal MACs, nncompress vs torch-pruning, and
recurrent models (hidden-unit pruning, SVD) where torch-pruning has no answer.

Every tool starts from the same trained model and gets the same fine-tuning budget
(``FINE_TUNE_EPOCHS`` at ``LR``, cosine decay, through ``nncompress.train.fine_tune``).
What is timed is the model its user gets back (ours: ``nc.load`` of the saved ``.nnc``
file). Latencies of one model family are measured together, interleaved over
``ROUNDS`` rounds, keeping each model's best median: on a shared 2-core machine this
removes most of the drift between models measured minutes apart.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params, latency
from nncompress.recipe import Recipe, Stage
from nncompress.report import fmt_bytes, fmt_count, fmt_ms, fmt_pct, fmt_ratio, render_markdown
from peers import run_torch_pruning, try_peer

SEED = 0
LR = 3e-3
FINE_TUNE_EPOCHS = 20
BATCHES = (1, 256)
ROUNDS = 7
THREADS = 1
TP = "torch-pruning (L1, MagnitudePruner)"

STRUCTURED_INTRO = f"""## Structured pruning at equal MACs vs torch-pruning

Every method starts from the same trained model, removes whole channels / hidden units /
heads until the target is met, then gets the same {FINE_TUNE_EPOCHS} epochs of fine-tuning
(Adam, lr {LR}, cosine decay). torch-pruning: `MagnitudePruner` with L1
`MagnitudeImportance`, the pruning ratio bisected until its MACs meet the same target,
classifier outputs ignored (its documented quick start). `+ fold_batchnorm` means the
BatchNorms were folded into their convolutions after fine-tuning (Jacob et al. 2018; same
outputs, one layer fewer per block) -- the unpruned model is shown both ways so the share
of the speed-up that comes from folding is visible. Latency: CPU median of the model each
user gets back (ours: `nc.load` of the `.nnc` file), batch 1 and 256, {THREADS} thread,
best of {ROUNDS} interleaved rounds of 20 timed calls (timings on this shared machine drift
by up to 2x between minutes, so only rows timed together are compared); speed-up =
unpruned (as trained) / this row. Recurrent rows:
hidden-unit pruning removes units from every gate matrix and the next layer; torch-pruning
has no GRU rule and fails on these LSTMs (its error is shown)."""


@dataclass(frozen=True)
class StructRow:
    model: str
    method: str
    target: str
    accuracy: float | None
    accuracy_delta: float | None
    params: int | None
    macs: int | None
    macs_ratio: float | None
    file_bytes: int | None
    latency_ms: tuple[float, float] | None = None
    speedup: tuple[float, float] | None = None
    note: str = ""


@dataclass
class Family:
    """One model family's rows and the modules to time together."""

    data: Dataset
    rows: list[StructRow]
    modules: list[nn.Module | None]


def _static(name: str, method: str, target: str, model: nn.Module, data: Dataset,
            base: StructRow | None) -> StructRow:
    acc = accuracy(model, data.test)
    macs = count_macs(model, example_input(data, 1)).total
    return StructRow(
        name, method, target, acc, None if base is None else acc - (base.accuracy or 0.0),
        count_params(model).total, macs, None if base is None else (base.macs or 0) / macs,
        artifact_bytes(model))


def _failed(name: str, method: str, target: str, err: str | None) -> StructRow:
    return StructRow(name, method, target, None, None, None, None, None, None,
                     note=f"failed: {err}")


def _ours(model: nn.Module, data: Dataset, stages: tuple[Stage, ...], tmp: Path) -> nn.Module:
    result = nc.compress(model, Recipe("bench", stages), data, seed=SEED, progress=False,
                         measure_latency=False)
    path = tmp / "bench.nnc"
    nc.save(result.model, path)
    return nc.load(path)


FOLD = Stage.technique("fold_batchnorm")


def _tuned(stage: Stage, fold: bool) -> tuple[Stage, ...]:
    tune = Stage.fine_tune(epochs=FINE_TUNE_EPOCHS, lr=LR, schedule="cosine")
    return (stage, tune, FOLD) if fold else (stage, tune)


def _cnn_methods(reduction: float) -> dict[str, tuple[Stage, ...]]:
    def l1(criterion: str) -> Stage:
        return Stage.technique("l1_filter_prune", macs_reduction=reduction,
                               epochs_per_step=0, criterion=criterion)

    return {
        "nncompress l1_filter_prune (filter L1) + fold_batchnorm": _tuned(l1("filter"), True),
        "nncompress l1_filter_prune (group L1) + fold_batchnorm": _tuned(l1("group"), True),
        "nncompress thinet + fold_batchnorm": _tuned(
            Stage.technique("thinet", macs_reduction=reduction), True),
        "nncompress channel_lasso + fold_batchnorm": _tuned(
            Stage.technique("channel_lasso", macs_reduction=reduction), True),
    }


def _rnn_methods() -> dict[str, tuple[Stage, ...]]:
    return {
        "nncompress l1_filter_prune (hidden units, group L1)": _tuned(Stage.technique(
            "l1_filter_prune", macs_reduction=2.0, epochs_per_step=0, criterion="group"),
            False),
        "nncompress low_rank (SVD, 2x params)": _tuned(Stage.technique(
            "low_rank", params_reduction=2.0), False),
    }


def _add(fam: Family, name: str, method: str, target: str, run: Callable[[], nn.Module],
         echo: Callable[[str], None]) -> None:
    echo(f"  {name} {method} {target}")
    got, err = try_peer(run)
    base = fam.rows[0] if fam.rows else None
    fam.rows.append(_static(name, method, target, got, fam.data, base) if got is not None
                    else _failed(name, method, target, err))
    fam.modules.append(got)


def _time(fam: Family) -> list[StructRow]:
    """Interleaved latency rounds; each model's best median per batch size."""
    best: list[list[float]] = [[float("inf")] * len(BATCHES) for _ in fam.modules]
    for _ in range(ROUNDS):
        for i, module in enumerate(fam.modules):
            if module is None:
                continue
            rep = latency(module, fam.data.input_shape, batch_sizes=BATCHES, warmup=5,
                          repeats=20, threads=THREADS)
            best[i] = [min(b, r.median_ms) for b, r in zip(best[i], rep.results, strict=True)]
    base = best[0]
    out = []
    for row, module, ms in zip(fam.rows, fam.modules, best, strict=True):
        if module is None:
            out.append(row)
            continue
        out.append(replace(row, latency_ms=(ms[0], ms[1]),
                           speedup=(base[0] / ms[0], base[1] / ms[1])))
    return out


def _cnn_family(tmp: Path, echo: Callable[[str], None]) -> list[StructRow]:
    model, data = zoo.load("cnn1d", "mnist1d", seed=SEED, progress=False)
    fam = Family(data, [], [])
    _add(fam, "cnn1d", "unpruned", "-", lambda: model, echo)
    _add(fam, "cnn1d", "unpruned + fold_batchnorm", "-",
         lambda: _ours(model, data, (FOLD,), tmp), echo)
    for reduction in (2.0, 4.0):
        target = f"{reduction:g}x fewer MACs"
        for method, stages in _cnn_methods(reduction).items():
            _add(fam, "cnn1d", method, target,
                 lambda stages=stages: _ours(model, data, stages, tmp), echo)
        _add(fam, "cnn1d", TP, target, lambda reduction=reduction: run_torch_pruning(
            model, data, reduction, steps=1, epochs_per_step=0, final_epochs=FINE_TUNE_EPOCHS,
            lr=LR, seed=SEED, lr_schedule="cosine"), echo)
    return _time(fam)


def _rnn_family(name: str, tmp: Path, echo: Callable[[str], None]) -> list[StructRow]:
    model, data = zoo.load(name, "mnist1d", seed=SEED, progress=False)
    fam = Family(data, [], [])
    _add(fam, name, "unpruned", "-", lambda: model, echo)
    target = "2x fewer MACs/params"
    for method, stages in _rnn_methods().items():
        _add(fam, name, method, target, lambda stages=stages: _ours(model, data, stages, tmp),
             echo)
    _add(fam, name, TP, target, lambda: run_torch_pruning(
        model, data, 2.0, steps=1, epochs_per_step=0, final_epochs=FINE_TUNE_EPOCHS, lr=LR,
        seed=SEED, lr_schedule="cosine"), echo)
    return _time(fam)


def bench_structured(echo: Callable[[str], None]) -> list[StructRow]:
    warnings.filterwarnings("ignore", module="torch_pruning")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        rows = _cnn_family(tmp, echo)
        for name in ("gru", "lstm"):
            rows += _rnn_family(name, tmp, echo)
    return rows


def structured_markdown(rows: list[StructRow]) -> str:
    headers = ["model", "method", "target", "accuracy", "Δ accuracy", "params", "MACs",
               "MACs ratio", "bytes (.nnc)", "latency b1", "latency b256", "speed-up b1",
               "speed-up b256", "note"]
    cells = []
    for r in rows:
        lat = r.latency_ms or (None, None)
        spd = r.speedup or (None, None)
        cells.append([r.model, r.method, r.target, fmt_pct(r.accuracy),
                      fmt_pct(r.accuracy_delta, signed=True), fmt_count(r.params),
                      fmt_count(r.macs), fmt_ratio(r.macs_ratio), fmt_bytes(r.file_bytes),
                      fmt_ms(lat[0]), fmt_ms(lat[1]), fmt_ratio(spd[0]), fmt_ratio(spd[1]),
                      r.note])
    return render_markdown(headers, cells)
