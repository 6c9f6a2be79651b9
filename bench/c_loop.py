"""A C timing loop for the deployment section's C exports (``bench/deploy_c.py``).

The exported ``model.c`` is linked into a small C program that calls ``nnc_predict``
(one sample, the model's static arena) in a loop on one real test sample and prints the
mean ns per call: batch-1 latency with no Python and no ctypes in the way, what a device
running the export would see (on this CPU, with the runtime's gcc flags).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from peers import try_peer

__all__ = ["LOOP_ROUNDS", "LOOP_SECONDS", "c_loop_ms", "fmt_us"]

_DRIVER = r"""#define _POSIX_C_SOURCE 199309L
#include "model.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static unsigned char sample[NNC_INPUT0_NUMEL * 8];
static float out[NNC_OUTPUT0_NUMEL];
static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}
int main(int argc, char **argv) {
    long calls = argc > 2 ? atol(argv[1]) : 1000, i;
    FILE *f = argc > 2 ? fopen(argv[2], "rb") : NULL;
    double start;
    if (f == NULL || fread(sample, 1, sizeof sample, f) == 0) return 2;
    fclose(f);
    for (i = 0; i < calls / 10 + 1; i++) nnc_predict(sample, out);
    start = now_ns();
    for (i = 0; i < calls; i++) nnc_predict(sample, out);
    printf("%.1f %g\n", (now_ns() - start) / (double)calls, (double)out[0]);
    return 0;
}
"""
LOOP_ROUNDS = 5
LOOP_SECONDS = 0.05


def _build_loop(folder: Path, sample: torch.Tensor) -> Path:
    """A timing program: ``folder``'s exported ``model.c`` + a driver calling
    ``nnc_predict`` (one sample, the static arena) in a loop, compiled with the runtime's
    flags (gcc -O3 -march=native); ``sample``: one input sample (written beside it)."""
    from nncompress.kernels.cbuild import FLAGS

    (folder / "loop.c").write_text(_DRIVER)
    sample.detach().contiguous().numpy().tofile(folder / "sample.bin")
    flags = [f for f in FLAGS if f not in ("-shared", "-fPIC")]
    exe = folder / "loop"
    subprocess.run(["gcc", *flags, "-o", str(exe), str(folder / "loop.c"),
                    str(folder / "model.c"), "-I", str(folder)], check=True,
                   capture_output=True)
    return exe


def _loop_once(exe: Path, calls: int) -> float:
    out = subprocess.run([str(exe), str(calls), str(exe.parent / "sample.bin")], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[0]) / 1e6        # ns -> ms


def c_loop_ms(folders: Sequence[Path], sample: torch.Tensor) -> list[float | None]:
    """Batch-1 ms per ``nnc_predict`` call of each C export in ``folders``, measured by a
    C timing loop (no Python, no ctypes): ``LOOP_ROUNDS`` interleaved rounds of about
    ``LOOP_SECONDS`` each per model, the median kept. None where the build failed."""
    exes: list[Path | None] = []
    for folder in folders:
        exe, _ = try_peer(lambda folder=folder: _build_loop(folder, sample))
        exes.append(exe)
    calls = [max(100, int(LOOP_SECONDS * 1e3 / max(_loop_once(e, 200), 1e-6)))
             if e is not None else 0 for e in exes]
    times: list[list[float]] = [[] for _ in exes]
    for _ in range(LOOP_ROUNDS):
        for k, exe in enumerate(exes):
            if exe is not None:
                times[k].append(_loop_once(exe, calls[k]))
    return [sorted(t)[len(t) // 2] if t else None for t in times]


def fmt_us(ms: float | None) -> str:
    """Milliseconds shown in microseconds with two decimals (C calls take a few µs)."""
    return "-" if ms is None else f"{ms * 1e3:.2f} µs"
