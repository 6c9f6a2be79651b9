"""Bench section: the generated-C int8 engine on a 784-300-100-10 MLP.

Integer-arithmetic-only inference (Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018). One fp32 MLP
(784-300-100-10, ReLU, seeded random weights) is converted by ``quant.convert`` (min/max
calibration on 256 seeded standard-normal samples) into an integer program, which runs
three ways, timed *interleaved* by ``nncompress.measure.timing.latency_ab`` (``ROUNDS``
rounds, rotating order, median ms per call of a whole batch) at batch 1 and 256 with
``THREADS`` torch threads:

* ``engine``: the program compiled to C (``kernels.int8.compile_program``: gcc -O3
  -march=native, AVX-512 VNNI dot products where the CPU has them), one ctypes call per
  batch; batches of 256 split over ``THREADS`` threads;
* ``reference``: the integer reference executor (``quant.reference.run``, int64 torch ops);
* ``fp32``: the eager torch MLP the program came from.

The engine's outputs are checked bit for bit against the reference on 256 samples.

Usage: ``python -c "import sys; sys.path.insert(0, 'bench'); import int8_engine;
print(int8_engine.section())"``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nncompress.kernels.int8 import Engine, compile_program
from nncompress.measure.timing import latency_ab
from nncompress.quant import reference
from nncompress.quant.convert import convert
from nncompress.quant.program import Program
from nncompress.report import fmt_ms, fmt_ratio, render_markdown

__all__ = ["EngineRow", "build", "measure", "section"]

SEED = 0
SIZES = (784, 300, 100, 10)
THREADS = 2
ROUNDS = 5
TIMING = {1: (5, 200), 256: (2, 30)}   # batch -> (warm-up calls per round, timed calls)


class _Call(nn.Module):
    """A callable as a module (for ``latency_ab``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@dataclass(frozen=True)
class EngineRow:
    batch: int
    engine_ms: float
    reference_ms: float
    fp32_ms: float


@dataclass(frozen=True)
class Built:
    fp32: nn.Module
    program: Program
    engine: Engine
    compile_s: float
    bit_exact: bool


def build() -> Built:
    """The fp32 MLP, its integer program and the compiled engine (timed, checked)."""
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(SIZES) - 2 else [])
    fp32 = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(SEED)
    calib = torch.randn(256, SIZES[0], generator=g)
    program, _ = convert(fp32, [calib[:128], calib[128:]])
    start = time.perf_counter()
    engine = compile_program(program, [(SIZES[0],)], threads=THREADS)
    compile_s = time.perf_counter() - start
    x = torch.randn(256, SIZES[0], generator=g)
    exact = all(torch.equal(a, b) for a, b in zip(engine(x), reference.run(program, x),
                                                   strict=True))
    return Built(fp32, program, engine, compile_s, exact)


def measure(built: Built) -> list[EngineRow]:
    """Interleaved latency of engine, reference and fp32 at each batch size."""
    program, engine = built.program, built.engine
    subjects = [_Call(lambda x: engine(x)[0]), _Call(lambda x: reference.run(program, x)[0]),
                built.fp32]
    example = torch.randn(1, SIZES[0], generator=torch.Generator().manual_seed(SEED + 1))
    rows = []
    for batch, (warmup, repeats) in TIMING.items():
        reports = latency_ab(subjects, batch_sizes=(batch,), warmup=warmup, repeats=repeats,
                             rounds=ROUNDS, threads=THREADS, example=example)
        ms = [r.results[0].median_ms for r in reports]
        rows.append(EngineRow(batch, *ms))
    return rows


def section() -> str:
    built = build()
    rows = measure(built)
    table = render_markdown(
        ["batch", "C engine", "integer reference", "fp32 eager torch", "engine vs reference",
         "engine vs fp32"],
        [[str(r.batch), fmt_ms(r.engine_ms), fmt_ms(r.reference_ms), fmt_ms(r.fp32_ms),
          fmt_ratio(r.reference_ms / r.engine_ms), fmt_ratio(r.fp32_ms / r.engine_ms)]
         for r in rows])
    info = built.engine.info
    return "\n".join([
        "### int8 C engine: 784-300-100-10 MLP",
        "",
        f"One integer program (Jacob et al. 2018) run as generated C, as the integer "
        f"reference and as the fp32 torch MLP it was converted from; median ms per call of a "
        f"whole batch, timed interleaved over {ROUNDS} rounds with {THREADS} threads; ratios "
        f"are speed-ups of the engine (higher is better).",
        "",
        table,
        "",
        f"Engine: gcc build {built.compile_s:.1f} s (cached by hash afterwards), weights and "
        f"tables {info.const_bytes:,} B of static const data, arena {info.arena_bytes:,} B "
        f"for {info.block} samples per pass; outputs bit-exact vs the reference on 256 "
        f"samples: {'yes' if built.bit_exact else 'NO'}.",
    ])


if __name__ == "__main__":
    print(section())
