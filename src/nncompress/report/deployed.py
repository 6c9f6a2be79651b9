"""The deployed-form table of the demo report: each row's deployed form (ONNX Runtime or
generated C, through ``nncompress.runtime``) next to eager PyTorch, timed together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nncompress.report.tables import fmt_ms, fmt_ratio, render_markdown, render_text

__all__ = ["DEPLOYED_HEADERS", "Deployed", "deployed_cells", "deployed_markdown",
           "deployed_section", "deployed_text"]

FORM_NAMES = {"onnx": "ONNX Runtime", "c": "C (ctypes)", "torch": "PyTorch (.nnc)"}
DEPLOYED_HEADERS = ("model", "technique", "deployed form", "eager b1", "deployed b1",
                    "speed-up b1", "eager bN", "deployed bN", "speed-up bN")


class Deployed(Protocol):
    """What the table reads (:class:`nncompress.demo_deploy.DeployedLatency`)."""

    form: str | None
    b1_ms: float | None
    bn_ms: float | None
    eager_b1_ms: float
    eager_bn_ms: float
    batch_n: int
    notes: tuple[str, ...]


def _speedup(eager: float, deployed: float | None) -> float | None:
    return None if deployed is None or deployed <= 0 else eager / deployed


def deployed_cells(model: str, technique: str, lat: Deployed) -> list[str]:
    """One table row: the forms' latencies in ms and eager / deployed speed-ups."""
    form = FORM_NAMES.get(lat.form, lat.form) if lat.form else "none (see notes)"
    return [model, technique, form, fmt_ms(lat.eager_b1_ms), fmt_ms(lat.b1_ms),
            fmt_ratio(_speedup(lat.eager_b1_ms, lat.b1_ms)), fmt_ms(lat.eager_bn_ms),
            fmt_ms(lat.bn_ms), fmt_ratio(_speedup(lat.eager_bn_ms, lat.bn_ms))]


def deployed_text(rows: Sequence[tuple[str, str, Deployed]]) -> str:
    """The table for a terminal."""
    return render_text(DEPLOYED_HEADERS, [deployed_cells(*r) for r in rows])


def deployed_markdown(rows: Sequence[tuple[str, str, Deployed]]) -> str:
    """The table as Markdown."""
    return render_markdown(DEPLOYED_HEADERS, [deployed_cells(*r) for r in rows])


def deployed_section(rows: Sequence[tuple[str, str, Deployed]]) -> str:
    """The report's section: heading, how it was measured, the table, notes on forms that
    could not be exported."""
    batch_n = rows[0][2].batch_n if rows else 256
    notes = [f"- {model} / {technique}: {note}" for model, technique, lat in rows
             for note in lat.notes]
    return "\n".join([
        "## Deployed form vs eager PyTorch", "",
        "Each row's model exported the way a user ships it -- ONNX always "
        "(`nncompress export` / `nc.export`), dependency-free C when the model holds an int8 "
        "program -- and loaded with `nc.runtime.load`, as is the compressed model's `.nnc` file "
        "(the eager module, an int8 model's own engine); the deployed form is the fastest "
        "of those at batch 1 (ONNX Runtime session, the C compiled with gcc and called "
        "through ctypes, or PyTorch). Each form is timed through its `predict` call, "
        "interleaved with the eager `nn.Module` in alternating rounds on real test "
        f"samples (median ms per call at batch 1 and batch N = {batch_n}); speed-up = "
        "eager / deployed. These eager figures are from this run, so they may differ "
        "from the main table's.", "",
        deployed_markdown(rows), "",
        *(["Forms that could not be made:", "", *notes] if notes else [])]).rstrip()
