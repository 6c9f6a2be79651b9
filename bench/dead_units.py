"""Bench section: dead-unit elimination after Deep Compression.

The ``deep-compression`` recipe (sparse VD -> BN folding -> 5-bit weight sharing) leaves
hidden units / channels with no live incoming or outgoing weight; ``dead_units`` removes
them (constants folded into the next layer's bias, same outputs). Each model is compressed
twice from the same trained model and seed: the recipe without its last ``dead_units``
stage, and the recipe as shipped. Reported: test accuracy, bytes of the ``.nnc`` file, ratio vs
the fp32 ``torch.save(state_dict)`` file, the units removed per group, and the batch-1 CPU
latency of the dense model and of each compressed model as ``nc.load`` gives it back,
timed interleaved (``ROUNDS`` rounds, rotating order, ``THREADS`` thread).

Usage alone: ``python bench/dead_units.py`` (prints the markdown table).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.graph import channel_groups
from nncompress.measure import accuracy
from nncompress.measure.timing import latency_ab
from nncompress.recipe import Recipe
from nncompress.report import fmt_ms, fmt_pct, fmt_ratio, render_markdown

SEED = 0
MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"))
ROUNDS = 40
REPEATS = 4000  # timed batch-1 calls per model, spread over the rounds
WARMUP = 20
THREADS = 1

DEAD_UNITS_INTRO = f"""## Dead-unit elimination after Deep Compression

`deep-compression` without its last `dead_units` stage vs as shipped (units
with no live incoming or outgoing weight removed, constants folded into the next layer's
bias; same outputs), both from the same trained model and seed {SEED}. Bytes: the `.nnc`
file; ratio: fp32 `torch.save(state_dict)` bytes / `.nnc` bytes. Latency: CPU median of
batch-1 calls of the dense model and of each compressed model loaded back with `nc.load`,
{REPEATS} calls per model in {ROUNDS} interleaved rounds (rotating order), {THREADS}
thread."""


@dataclass(frozen=True)
class DeadUnitsRow:
    model: str
    dataset: str
    accuracy_dense: float
    accuracy_dc: float
    accuracy_dead: float
    bytes_dc: int
    bytes_dead: int
    ratio_dc: float
    ratio_dead: float
    units: str
    latency_ms: tuple[float, float, float]  # dense, deep-compression, + dead_units


def _units(before: nn.Module, after: nn.Module, data: Dataset) -> str:
    """``group old->new`` for every channel group whose size changed."""
    x = example_input(data, 2)
    new = {g.name: g.size for g in channel_groups(after, x)}
    return ", ".join(f"{g.name} {g.size}->{new[g.name]}" for g in channel_groups(before, x)
                     if new.get(g.name, g.size) != g.size) or "none"


def _saved(result: nc.CompressionResult, path: Path) -> tuple[nn.Module, int]:
    size = nc.save(result.model, path)
    return nc.load(path), size


def _one(name: str, dataset: str, tmp: Path, echo: Callable[[str], None]) -> DeadUnitsRow:
    model, data = zoo.load(name, dataset, seed=SEED, progress=False)
    shipped = Recipe.named("deep-compression")
    without = Recipe("dc-without-dead-units",
                     tuple(s for s in shipped.stages if s.name != "dead_units"))
    echo(f"  {name}: deep-compression without its dead_units stage")
    dc = nc.compress(model, without, data, seed=SEED, progress=False, measure_latency=False)
    echo(f"  {name}: deep-compression as shipped (ends with dead_units)")
    dead = nc.compress(model, shipped, data, seed=SEED, progress=False,
                       measure_latency=False, baseline=dc.baseline)
    loaded_dc, bytes_dc = _saved(dc, tmp / f"{name}-dc.nnc")
    loaded_dead, bytes_dead = _saved(dead, tmp / f"{name}-dead.nnc")
    echo(f"  {name}: batch-1 latency, {ROUNDS} interleaved rounds")
    reports = latency_ab([model, loaded_dc, loaded_dead], batch_sizes=(1,), warmup=WARMUP,
                         repeats=REPEATS, rounds=ROUNDS, threads=THREADS,
                         example=example_input(data, 1))
    return DeadUnitsRow(
        model=name, dataset=dataset, accuracy_dense=dc.baseline.accuracy,
        accuracy_dc=accuracy(loaded_dc, data.test),
        accuracy_dead=accuracy(loaded_dead, data.test),
        bytes_dc=bytes_dc, bytes_dead=bytes_dead,
        ratio_dc=dc.baseline.torch_save_bytes / bytes_dc,
        ratio_dead=dc.baseline.torch_save_bytes / bytes_dead,
        units=_units(dc.model, dead.model, data),
        latency_ms=tuple(r.results[0].median_ms for r in reports))


def bench_dead_units(echo: Callable[[str], None]) -> list[DeadUnitsRow]:
    """Deep Compression without and with its last ``dead_units`` stage on mlp and cnn1d."""
    with tempfile.TemporaryDirectory() as tmp:
        return [_one(name, dataset, Path(tmp), echo) for name, dataset in MODELS]


def dead_units_markdown(rows: list[DeadUnitsRow]) -> str:
    """One row per model: accuracy, bytes and ratio without / with dead-unit elimination,
    the units removed, and interleaved batch-1 latency (speed-up vs the dense model)."""
    headers = ["model", "accuracy dense", "accuracy DC", "accuracy DC + dead_units",
               "bytes DC", "bytes DC + dead_units", "ratio vs fp32 DC",
               "ratio vs fp32 DC + dead_units", "units removed", "latency b1 dense",
               "latency b1 DC", "latency b1 DC + dead_units"]
    cells = []
    for r in rows:
        dense, dc, dead = r.latency_ms
        cells.append([f"{r.model} ({r.dataset})", fmt_pct(r.accuracy_dense),
                      fmt_pct(r.accuracy_dc), fmt_pct(r.accuracy_dead), f"{r.bytes_dc:,} B",
                      f"{r.bytes_dead:,} B", fmt_ratio(r.ratio_dc), fmt_ratio(r.ratio_dead),
                      r.units, fmt_ms(dense), f"{fmt_ms(dc)} ({fmt_ratio(dense / dc)})",
                      f"{fmt_ms(dead)} ({fmt_ratio(dense / dead)})"])
    return render_markdown(headers, cells)


if __name__ == "__main__":
    def _echo(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(DEAD_UNITS_INTRO + "\n\n" + dead_units_markdown(bench_dead_units(_echo)))
