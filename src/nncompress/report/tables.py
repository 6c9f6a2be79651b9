"""Number formatting and plain-text / Markdown tables: the only place numbers meet people."""

from __future__ import annotations

from collections.abc import Sequence


def fmt_bytes(n: int | float | None) -> str:
    """Bytes with a binary unit, e.g. ``12.3 KiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_count(n: int | float | None) -> str:
    """A count with a metric suffix, e.g. ``1.23 M``."""
    if n is None:
        return "-"
    value = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def fmt_pct(x: float | None, *, signed: bool = False) -> str:
    """A fraction in [0, 1] as percent, e.g. ``94.10 %`` (``+0.20 pt`` when signed)."""
    if x is None:
        return "-"
    return f"{100 * x:+.2f} pt" if signed else f"{100 * x:.2f} %"


#: quality metrics shown as percentages (fractions in [0, 1]); the others as plain numbers.
_PERCENT_METRICS = ("accuracy", "agreement")


def fmt_quality(x: float | None, metric: str = "accuracy", *, signed: bool = False) -> str:
    """A quality value in its metric's form: accuracy / agreement as ``94.10 %`` (``+0.20
    pt`` signed), cosine, R², MSE and KL as ``0.9931`` (``-0.0012`` signed)."""
    if metric in _PERCENT_METRICS or x is None:
        return fmt_pct(x, signed=signed)
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def quality_header(metric: str = "accuracy") -> str:
    """The column title of a quality metric, e.g. ``accuracy`` or ``cosine to teacher``."""
    from nncompress.measure.quality import METRICS

    return METRICS.get(metric).label if metric in METRICS else metric


def fmt_ratio(x: float | None) -> str:
    """A ratio as ``3.21x``."""
    return "-" if x is None else f"{x:.2f}x"


def fmt_ms(x: float | None) -> str:
    """Milliseconds with three significant decimals."""
    return "-" if x is None else f"{x:.3f} ms"


def render_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Align columns for a terminal; numbers are right-aligned, text left-aligned."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in rows) if rows else False
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def render_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _looks_numeric(cell: str) -> bool:
    head = cell.strip().lstrip("+-")
    return bool(head) and (head[0].isdigit() or head == "-")
