"""One row of a results table (a model after one technique), built from measurements."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nncompress.measure import Measurement, compare
from nncompress.report.tables import (
    fmt_bytes,
    fmt_count,
    fmt_ms,
    fmt_quality,
    fmt_ratio,
    quality_header,
    render_markdown,
    render_text,
)

HEADERS = (
    "model", "data", "technique", "accuracy", "Δ accuracy", "bytes on disk", "ratio",
    "params (nz)", "MACs", "nz MACs", "latency b1", "speed-up b1", "latency bN", "speed-up bN",
)


@dataclass(frozen=True)
class ResultRow:
    """A compressed model's numbers next to its uncompressed baseline.

    Sizes are bytes of the saved .nnc file; ratios are baseline / compressed (>1 is better);
    latencies are CPU medians in milliseconds at batch 1 and at the larger batch ``batch_n``.
    ``accuracy`` is the value of the quality ``metric`` (top-1 accuracy by default).
    """

    model: str
    dataset: str
    technique: str
    accuracy: float
    accuracy_delta: float
    artifact_bytes: int
    size_ratio: float
    params: int
    nonzero_params: int
    macs: int
    sparse_macs: int
    latency_b1_ms: float | None
    speedup_b1: float | None
    batch_n: int | None
    latency_bn_ms: float | None
    speedup_bn: float | None
    metric: str = "accuracy"

    @classmethod
    def build(cls, model: str, dataset: str, technique: str,
              before: Measurement, after: Measurement) -> ResultRow:
        cmp = compare(before, after)
        lat = {r.batch: r.median_ms for r in after.latency.results} if after.latency else {}
        spd = dict(cmp.speedup)
        batch_n = max(lat) if len(lat) > 1 else None
        return cls(
            model=model, dataset=dataset, technique=technique,
            accuracy=after.accuracy, accuracy_delta=cmp.accuracy_delta,
            artifact_bytes=after.artifact_bytes, size_ratio=cmp.size_ratio,
            params=after.params.total, nonzero_params=after.params.nonzero,
            macs=after.macs.total,
            sparse_macs=sum(layer.sparse_macs for layer in after.macs.layers),
            latency_b1_ms=lat.get(1), speedup_b1=spd.get(1),
            batch_n=batch_n, latency_bn_ms=lat.get(batch_n) if batch_n else None,
            speedup_bn=spd.get(batch_n) if batch_n else None, metric=after.metric,
        )

    def cells(self) -> list[str]:
        return [
            self.model, self.dataset, self.technique, fmt_quality(self.accuracy, self.metric),
            fmt_quality(self.accuracy_delta, self.metric, signed=True),
            fmt_bytes(self.artifact_bytes),
            fmt_ratio(self.size_ratio),
            f"{fmt_count(self.params)} ({fmt_count(self.nonzero_params)})",
            fmt_count(self.macs), fmt_count(self.sparse_macs), fmt_ms(self.latency_b1_ms),
            fmt_ratio(self.speedup_b1), fmt_ms(self.latency_bn_ms), fmt_ratio(self.speedup_bn),
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def headers(rows: list[ResultRow]) -> tuple[str, ...]:
    """:data:`HEADERS` with the quality columns named after the rows' metric (``quality``
    when the rows mix metrics)."""
    metrics = {r.metric for r in rows} or {"accuracy"}
    title = quality_header(metrics.pop()) if len(metrics) == 1 else "quality"
    return (*HEADERS[:3], title, f"Δ {title}", *HEADERS[5:])


def rows_text(rows: list[ResultRow]) -> str:
    """A terminal table of result rows."""
    return render_text(headers(rows), [r.cells() for r in rows])


def rows_markdown(rows: list[ResultRow]) -> str:
    """A Markdown table of result rows."""
    return render_markdown(headers(rows), [r.cells() for r in rows])
