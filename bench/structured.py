"""Bench section: structured pruning at equal MACs, nncompress vs torch-pruning, and
recurrent models (hidden-unit pruning, SVD) where torch-pruning has no answer.

Every tool starts from the same trained model and gets the same fine-tuning budget
(``FINE_TUNE_EPOCHS`` at ``LR`` through ``nncompress.train.fine_tune``). What is timed is
the model its user gets back (ours: ``nc.load`` of the saved ``.nnc`` file).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


STRUCTURED_INTRO = f"""## Structured pruning at equal MACs vs torch-pruning

Every method starts from the same trained model, removes whole channels / hidden units /
heads until the target is met, then gets the same {FINE_TUNE_EPOCHS} epochs of fine-tuning
(Adam, lr {LR}). torch-pruning: `MagnitudePruner` with L1 `MagnitudeImportance`, the
pruning ratio bisected until its MACs meet the same target, classifier outputs ignored
(its documented quick start). Latency: CPU median of the model each user gets back
(ours: `nc.load` of the `.nnc` file), batch 1 and 256; speed-up = unpruned / pruned.
Recurrent rows: hidden-unit pruning removes units from every gate matrix and the next
layer; torch-pruning has no GRU rule and fails on these LSTMs (its error is shown)."""


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
    latency_ms: tuple[float, float] | None
    speedup: tuple[float, float] | None
    note: str = ""


def _measure(name: str, method: str, target: str, model: nn.Module, data: Dataset,
             base: StructRow | None) -> StructRow:
    x = example_input(data, 1)
    lat = latency(model, data.input_shape, batch_sizes=BATCHES, warmup=10, repeats=40)
    ms = tuple(r.median_ms for r in lat.results)
    acc = accuracy(model, data.test)
    macs = count_macs(model, x).total
    return StructRow(
        name, method, target, acc, None if base is None else acc - (base.accuracy or 0.0),
        count_params(model).total, macs,
        None if base is None else (base.macs or 0) / macs, artifact_bytes(model), ms,
        None if base is None or base.latency_ms is None
        else (base.latency_ms[0] / ms[0], base.latency_ms[1] / ms[1]))


def _ours(model: nn.Module, data: Dataset, stages: tuple[Stage, ...], tmp: Path) -> nn.Module:
    result = nc.compress(model, Recipe("bench", stages), data, seed=SEED, progress=False,
                         measure_latency=False)
    path = tmp / "bench.nnc"
    nc.save(result.model, path)
    return nc.load(path)


def _tuned(stage: Stage) -> tuple[Stage, ...]:
    return (stage, Stage.fine_tune(epochs=FINE_TUNE_EPOCHS, lr=LR))


def _cnn_methods(reduction: float) -> dict[str, tuple[Stage, ...]]:
    return {
        "nncompress l1_filter_prune": _tuned(Stage.technique(
            "l1_filter_prune", macs_reduction=reduction, scope="layer")),
        "nncompress thinet": _tuned(Stage.technique("thinet", macs_reduction=reduction)),
        "nncompress channel_lasso": _tuned(Stage.technique(
            "channel_lasso", macs_reduction=reduction)),
    }


def _rnn_methods() -> dict[str, tuple[Stage, ...]]:
    return {
        "nncompress l1_filter_prune (hidden units)": _tuned(Stage.technique(
            "l1_filter_prune", macs_reduction=2.0, scope="layer")),
        "nncompress low_rank (SVD, 2x params)": _tuned(Stage.technique(
            "low_rank", params_reduction=2.0)),
    }


def _run_all(name: str, data: Dataset, model: nn.Module, target: str,
             methods: dict[str, tuple[Stage, ...]], peer: Callable[[], nn.Module] | None,
             base: StructRow, tmp: Path, echo: Callable[[str], None]) -> list[StructRow]:
    rows: list[StructRow] = []
    for method, stages in methods.items():
        echo(f"  {name} {method} {target}")
        got, err = try_peer(lambda stages=stages: _ours(model, data, stages, tmp))
        rows.append(_measure(name, method, target, got, data, base) if got is not None
                    else StructRow(name, method, target, None, None, None, None, None, None,
                                   None, None, f"failed: {err}"))
    if peer is not None:
        echo(f"  {name} torch-pruning {target}")
        got, err = try_peer(peer)
        rows.append(_measure(name, "torch-pruning (L1, MagnitudePruner)", target, got, data,
                             base) if got is not None
                    else StructRow(name, "torch-pruning (L1, MagnitudePruner)", target, None,
                                   None, None, None, None, None, None, None,
                                   f"failed: {err}"))
    return rows


def bench_structured(echo: Callable[[str], None]) -> list[StructRow]:
    warnings.filterwarnings("ignore", module="torch_pruning")
    rows: list[StructRow] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model, data = zoo.load("cnn1d", "mnist1d", seed=SEED, progress=False)
        base = _measure("cnn1d", "unpruned", "-", model, data, None)
        rows.append(base)
        for reduction in (2.0, 4.0):
            def peer(reduction: float = reduction) -> nn.Module:
                return run_torch_pruning(model, data, reduction, steps=1, epochs_per_step=0,
                                         final_epochs=FINE_TUNE_EPOCHS, lr=LR, seed=SEED)
            rows += _run_all("cnn1d", data, model, f"{reduction:g}x fewer MACs",
                             _cnn_methods(reduction), peer, base, tmp, echo)
        for name in ("gru", "lstm"):
            model, data = zoo.load(name, "mnist1d", seed=SEED, progress=False)
            base = _measure(name, "unpruned", "-", model, data, None)
            rows.append(base)

            def rnn_peer(model: nn.Module = model, data: Dataset = data) -> nn.Module:
                return run_torch_pruning(model, data, 2.0, steps=1, epochs_per_step=0,
                                         final_epochs=FINE_TUNE_EPOCHS, lr=LR, seed=SEED)
            rows += _run_all(name, data, model, "2x fewer MACs/params", _rnn_methods(), rnn_peer,
                             base, tmp, echo)
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
                      r.note or ""])
    return render_markdown(headers, cells)
