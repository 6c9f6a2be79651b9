"""Deep Compression's per-stage table (Han, Mao & Dally 2015, Table 1 style): bytes of each
weight tensor at the baseline, after every technique stage, and with Huffman coding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _pick(column: Mapping[str, TensorBytes], name: str | None) -> list[TensorBytes]:
    """Tensor ``name`` of a column (none if absent there), or every tensor for the total."""
    if name is None:
        return list(column.values())
    return [column[name]] if name in column else []


def breakdown_cells(result: CompressionResult) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per weight tensor of the final model (then any the
    stages removed), and a total. Stage columns hold the best plain lossless encoding's
    bytes (no entropy coding); the last column adds Huffman-coded encodings."""
    columns: list[tuple[str, Sequence[TensorBytes]]] = [
        ("baseline", result.baseline.weights),
        *((f"after {s.name}", s.measurement.weights) for s in result.stages
          if s.kind == "technique")]
    by_col = [{t.name: t for t in col} for _, col in columns]
    last = {t.name: t for t in result.final.weights}
    names = list(dict.fromkeys([*last, *(n for col in by_col for n in col)]))
    headers = ["weight tensor", "elements", "non-zero", *(label for label, _ in columns),
               "+ Huffman", "ratio"]
    rows = []
    for name in [*names, None]:
        cells = [fmt_bytes(sum(t.plain for t in picked)) if (picked := _pick(col, name))
                 else "-" for col in by_col]
        base = sum(t.plain for t in _pick(by_col[0], name))
        ends = _pick(last, name)
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
