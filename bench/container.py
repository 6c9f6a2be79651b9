"""Bench section: the ``.nnc`` container -- save / load speed of a large dense model next
to ``torch.save`` / ``torch.load`` in the same run, and header bytes per reference model.

Usage alone: ``python bench/container.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nncompress as nc
from nncompress import formats
from nncompress import models as zoo
from nncompress.report import fmt_bytes, render_markdown

ROUNDS = 5
WIDTH, LAYERS = 2000, 5  # five 2000 x 2000 Linears: 20.0 M parameters, 80 MB of fp32

CONTAINER_INTRO = f"""## The container: speed of a lossless dense save, and header bytes

`nc.save` / `nc.load` of {LAYERS} `nn.Linear({WIDTH}, {WIDTH})` (20.0 M fp32 parameters)
against `torch.save(state_dict)` / `torch.load(weights_only=True)` + `load_state_dict` of
the same weights, alternated in one run, best of {ROUNDS} (our save fsyncs the file and
renames it into place; load checks the SHA-256 and every header field). Header bytes:
everything but the encoded tensors, per reference model as built (untrained), against the
budget of 300 bytes plus the tensor names."""


@dataclass(frozen=True)
class SpeedRow:
    what: str
    ours_s: float
    torch_s: float


def _best(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_speed(echo: Callable[[str], None]) -> list[SpeedRow]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    fresh = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "m.nnc", Path(tmp) / "m.pt"
        echo("  save / load of a 20M-parameter model")
        save_ours = _best(lambda: nc.save(model, ours))
        save_torch = _best(lambda: torch.save(model.state_dict(), theirs))
        load_ours = _best(lambda: nc.load(ours, skeleton=fresh))
        load_torch = _best(lambda: fresh.load_state_dict(torch.load(theirs, weights_only=True)))
        same = all(torch.equal(a, b) for a, b in zip(
            model.state_dict().values(), nc.load(ours, skeleton=fresh).state_dict().values(),
            strict=True))
    if not same:
        raise RuntimeError("the reloaded weights differ")
    return [SpeedRow("save", save_ours, save_torch), SpeedRow("load", load_ours, load_torch)]


@dataclass(frozen=True)
class HeaderRow:
    model: str
    header_bytes: int
    names_bytes: int
    file_bytes: int


def bench_headers(echo: Callable[[str], None]) -> list[HeaderRow]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in zoo.model_names():
            spec = zoo.spec(name)
            shape = (1, 8, 8) if spec.default_dataset == "digits" else (1, 40)
            model = zoo.build(name, shape, 10)
            path = Path(tmp) / f"{name}.nnc"
            nc.save(model, path)
            info = formats.inspect(path)
            names = sum(len(t.name.encode()) for t in info.tensors)
            rows.append(HeaderRow(name, info.header_bytes, names, info.total_bytes))
    return rows


def speed_markdown(rows: list[SpeedRow]) -> str:
    return render_markdown(
        ["", "nncompress (.nnc)", "torch", "nncompress / torch"],
        [[r.what, f"{r.ours_s:.3f} s", f"{r.torch_s:.3f} s", f"{r.ours_s / r.torch_s:.2f}x"]
         for r in rows])


def headers_markdown(rows: list[HeaderRow]) -> str:
    return render_markdown(
        ["model", "header bytes", "tensor names", "budget (300 + names)", "file"],
        [[r.model, str(r.header_bytes), str(r.names_bytes), str(300 + r.names_bytes),
          fmt_bytes(r.file_bytes)] for r in rows])


if __name__ == "__main__":
    def echo(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(speed_markdown(bench_speed(echo)))
    print()
    print(headers_markdown(bench_headers(echo)))
