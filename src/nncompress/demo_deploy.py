"""The demo's deployed forms: each demo row's model exported the way a user ships it and
timed next to eager PyTorch (issue 10: the deployed form is the product).

Every model is exported to ONNX (``nncompress.export.export``: float ONNX through the
TorchScript exporter, exact integer ONNX for int8 models) and, when it holds an integer
program (Jacob et al. 2018), to dependency-free C; with the model's ``.nnc`` file, that
file is a form too (the eager module, e.g. an int8 model's own engine); each form is
loaded with
``nncompress.runtime.load`` and timed through its ``predict`` call, interleaved with the
eager module in alternating rounds (:func:`nncompress.measure.timing.latency_ab`) on real
test samples at batch 1 and batch N. The deployed form is the fastest of those at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nncompress.data import Dataset, example_input
from nncompress.errors import raise_if_interrupted

__all__ = ["DeployedLatency", "deploy_and_time"]

#: timing of the demo's deployed-form comparison: rounds, warm-up calls per round,
#: timed calls in all per batch size
ROUNDS = 3
WARMUP = 3
REPEATS = 60
REPEATS_N = 9


@dataclass(frozen=True)
class DeployedLatency:
    """The deployed form of one model timed next to its eager module (median ms per call;
    ``bn`` at batch ``batch_n``). ``form`` is the fastest deployed form at batch 1
    (``"onnx"``, ``"c"`` or ``"torch"``: the ``.nnc`` through ``runtime.load``; None when
    no form could be exported or loaded, then its latencies are None); ``forms``: every
    form that ran, with its batch-1 median; ``notes``: one line per form that could not be made."""

    form: str | None
    b1_ms: float | None
    bn_ms: float | None
    eager_b1_ms: float
    eager_bn_ms: float
    batch_n: int
    forms: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"form": self.form, "b1_ms": self.b1_ms, "bn_ms": self.bn_ms,
                "eager_b1_ms": self.eager_b1_ms, "eager_bn_ms": self.eager_bn_ms,
                "batch_n": self.batch_n, "forms": [list(f) for f in self.forms],
                "notes": list(self.notes)}


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _export_forms(model: nn.Module, data: Dataset, folder: Path, threads: int,
                  nnc: Path | None) -> tuple[dict[str, Any], list[str]]:
    """Form name -> loaded Deployed for every form ``model`` exports to; notes for the
    forms that failed (a failure never stops the demo)."""
    from nncompress import runtime
    from nncompress.export import export, program_of

    folder.mkdir(parents=True, exist_ok=True)
    example = example_input(data, 4)
    targets: list[tuple[str, Path, str | None]] = [("onnx", folder / "model.onnx", "onnx")]
    if program_of(model) is not None:
        targets.append(("c", folder / "c", "c"))
    forms: dict[str, Any] = {}
    notes: list[str] = []
    if nnc is not None:
        targets.append(("torch", nnc, None))
    for form, path, fmt in targets:
        try:
            if fmt is not None:
                export(model, path, example, format=fmt)
            forms[form] = runtime.load(path, threads=threads)
        except Exception as exc:  # an export that fails is reported, not fatal
            raise_if_interrupted(exc)        # ... but a Ctrl-C inside it stops the demo
            notes.append(f"{form}: {_first_line(exc)}")
    return forms, notes


def deploy_and_time(model: nn.Module, data: Dataset, folder: Path, *, batch_n: int = 256,
                    threads: int | None = None, nnc: Path | None = None) -> DeployedLatency:
    """Export ``model`` into ``folder`` (``model.onnx``; ``c/`` for an integer program),
    load each form with ``runtime.load`` and time it interleaved with the eager module at
    batch 1 and ``batch_n`` (``threads``: torch's and ONNX Runtime's intra-op threads;
    default torch's current count). ``nnc``: the model's saved ``.nnc`` file, loaded by
    ``runtime.load`` as one more form (``"torch"``: what a user shipping the file runs)."""
    from nncompress.measure.timing import CallableModule, latency_ab

    threads = threads or torch.get_num_threads()
    forms, notes = _export_forms(model, data, folder, threads, nnc)
    subjects: list[nn.Module] = [model, *(CallableModule(d.predict) for d in forms.values())]
    x = example_input(data, 1)
    b1 = latency_ab(subjects, batch_sizes=(1,), warmup=WARMUP, repeats=REPEATS,
                    rounds=ROUNDS, threads=threads, example=x)
    bn = latency_ab(subjects, batch_sizes=(batch_n,), warmup=1, repeats=REPEATS_N,
                    rounds=ROUNDS, threads=threads, example=x)
    for deployed in forms.values():
        deployed.close()
    ms1 = [r.results[0].median_ms for r in b1]
    msn = [r.results[0].median_ms for r in bn]
    timed = tuple(zip(forms, ms1[1:], strict=True))
    if not timed:
        return DeployedLatency(None, None, None, ms1[0], msn[0], batch_n, (), tuple(notes))
    best = min(range(len(timed)), key=lambda k: timed[k][1])
    return DeployedLatency(timed[best][0], ms1[best + 1], msn[best + 1], ms1[0], msn[0],
                           batch_n, timed, tuple(notes))
