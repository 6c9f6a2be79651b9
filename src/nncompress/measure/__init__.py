"""Measurements of a model: parameters, MACs, bytes on disk, latency, accuracy.

Every function returns a value (a number or a frozen dataclass) and never prints; only
``nncompress.report`` and the CLI format numbers for people. Units are in each field's
name or docstring: element counts, per-sample MACs, bytes, milliseconds, fractions.
"""

from __future__ import annotations

from nncompress.measure.evaluation import accuracy
from nncompress.measure.macs import MAC_RULES, LayerMacs, MacCount, MacRule, count_macs
from nncompress.measure.params import ParamCount, count_params
from nncompress.measure.quality import METRICS, Metric, quality
from nncompress.measure.size import TensorBytes, artifact_bytes, torch_save_bytes, weight_bytes
from nncompress.measure.summary import Comparison, Measurement, compare, measure
from nncompress.measure.timing import BatchLatency, LatencyReport, latency

__all__ = [
    "MAC_RULES",
    "METRICS",
    "BatchLatency",
    "Comparison",
    "LatencyReport",
    "LayerMacs",
    "MacCount",
    "MacRule",
    "Measurement",
    "Metric",
    "ParamCount",
    "TensorBytes",
    "accuracy",
    "artifact_bytes",
    "compare",
    "count_macs",
    "count_params",
    "latency",
    "measure",
    "quality",
    "torch_save_bytes",
    "weight_bytes",
]
