"""Reports for people: tables, Markdown, JSON and PNG plots.

This is the only layer that formats numbers (with their units) for people.
"""

from nncompress.report.breakdown import breakdown_cells, bytes_breakdown
from nncompress.report.rows import HEADERS, ResultRow, rows_markdown, rows_text
from nncompress.report.tables import (
    fmt_bytes,
    fmt_count,
    fmt_ms,
    fmt_pct,
    fmt_ratio,
    render_markdown,
    render_text,
)
from nncompress.report.writer import ReportPaths, environment, write_report

__all__ = [
    "HEADERS", "ReportPaths", "ResultRow", "breakdown_cells", "bytes_breakdown", "environment",
    "fmt_bytes", "fmt_count", "fmt_ms", "fmt_pct", "fmt_ratio", "render_markdown",
    "render_text", "rows_markdown", "rows_text", "write_report",
]
