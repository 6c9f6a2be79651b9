"""Deep Compression's per-stage table (Han, Mao & Dally 2015, Table 1 style): bytes of each
weight tensor at the baseline, after every technique stage, and with Huffman coding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nncompress.measure import TensorBytes
from nncompress.report.tables import (
    fmt_bytes,
    fmt_pct,
    fmt_ratio,
    render_markdown,
    render_text,
)

if TYPE_CHECKING:  # api imports report lazily; no cycle at run time
    from nncompress.api import CompressionResult

__all__ = ["breakdown_cells", "bytes_breakdown"]


def breakdown_cells(result: CompressionResult) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per weight tensor of the final model (then any the
    stages removed), and a total. Stage columns hold the best plain lossless encoding's
    bytes (no entropy coding); the last column adds Huffman-coded encodings."""
    stages = [(f"after {s.name}", s.measurement.weights) for s in result.stages
              if s.kind == "technique"]
    columns: list[tuple[str, Sequence[TensorBytes]]] = [
        ("baseline", result.baseline.weights), *stages]
    final = result.final.weights
    names = [t.name for t in final]
    names += [t.name for _, col in columns for t in col if t.name not in names]
    by_col = [{t.name: t for t in col} for _, col in columns]
    last = {t.name: t for t in final}
    headers = ["weight tensor", "elements", "non-zero", *(label for label, _ in columns),
               "+ Huffman", "ratio"]
    rows = []
    for name in [*names, None]:
        cells, base, coded = [], 0, 0
        for col in by_col:
            picked = list(col.values()) if name is None else [col[name]] if name in col else []
            cells.append(fmt_bytes(sum(t.plain for t in picked)) if picked else "-")
        base = sum(t.plain for t in (by_col[0].values() if name is None else
                                     [by_col[0][name]] if name in by_col[0] else []))
        ends = list(last.values()) if name is None else [last[name]] if name in last else []
        coded = sum(t.coded for t in ends)
        numel = sum(t.numel for t in ends)
        nonzero = sum(t.nonzero for t in ends)
        rows.append(["total" if name is None else name, str(numel) if ends else "-",
                     fmt_pct(nonzero / numel) if numel else "-", *cells,
                     fmt_bytes(coded) if ends else "-",
                     fmt_ratio(base / coded) if base and coded else "-"])
    return headers, rows


def bytes_breakdown(result: CompressionResult, *, markdown: bool = False) -> str:
    """The table as text (or Markdown), with a title saying what is counted."""
    headers, rows = breakdown_cells(result)
    title = (f"{result.model_name or 'model'}, recipe {result.recipe.name}: bytes of each "
             "weight tensor (data only; biases, code tables and the file header are extra)")
    if markdown:
        return f"**{title}**\n\n" + render_markdown(headers, rows)
    return title + "\n" + render_text(headers, rows)
