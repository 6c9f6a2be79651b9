"""``nncompress eval``: measure one model -- test quality (``--metric``: accuracy, or a
label-free metric against ``--teacher``), bytes, MACs, latency, and optionally the sparse
engine's per-layer choice. On data with inputs only the default metric is the top-1
agreement of the model's outputs with ``--teacher``'s (e.g. the uncompressed model), which
is then required."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from nncompress.cli_commands import _table, emit
from nncompress.cli_inputs import CLIError, load_data, load_model, looks_like_file
from nncompress.cli_parser import model_spec

if TYPE_CHECKING:
    from torch import nn

    from nncompress.data import Dataset
    from nncompress.kernels import SparsifyReport

__all__ = ["HANDLERS"]


def _cmd_eval(args: argparse.Namespace) -> int:
    from nncompress import api
    from nncompress.cli_multi import eval_target, routed_macs
    from nncompress.report import fmt_bytes, fmt_count, fmt_ms, fmt_pct
    from nncompress.report.tables import fmt_quality, quality_header

    spec = model_spec(args)
    model = load_model(spec, args.model_class, "MODEL")
    data = load_data(args.data, seed=0)
    model, data = eval_target(model, spec, args, data)
    metric, teacher = _eval_metric(args, data)
    engine = _sparsify(model, data) if args.sparsify else None
    m = api.measure(model, data, with_latency=not args.no_latency, metric=metric,
                    teacher=teacher)
    routed = routed_macs(model, data)
    file_bytes = Path(spec).stat().st_size if looks_like_file(spec) else m.artifact_bytes
    if args.json:
        lat = [] if m.latency is None else [
            {"batch": r.batch, "median_ms": r.median_ms} for r in m.latency.results]
        out = {"metric": metric, "quality": m.accuracy, "file_bytes": file_bytes,
               "params": m.params.total, "nonzero_params": m.params.nonzero,
               "macs": m.macs.total, "latency": lat}
        if metric == "accuracy":
            out = {"accuracy": m.accuracy, **out}
        if routed is not None:
            out["routed_macs"] = routed
        if engine is not None:
            out["sparse_engine"] = [{"layer": c.name, "sparsity": c.sparsity,
                                     "dense_us": c.dense_us[0], "sparse_us": c.sparse_us[0],
                                     "choice": c.choice} for c in engine.layers]
        print(json.dumps(out, indent=2))
        return 0
    size_label = "file size" if looks_like_file(spec) else "file size (as nc.save writes it)"
    rows = [[f"test {quality_header(metric)}", fmt_quality(m.accuracy, metric)],
            [size_label, fmt_bytes(file_bytes)],
            ["parameters (non-zero)",
             f"{fmt_count(m.params.total)} ({fmt_count(m.params.nonzero)})"],
            ["MACs per sample", fmt_count(m.macs.total)]]
    if routed is not None:
        rows[-1] = ["MACs per sample (average as routed on the test split)", fmt_count(routed)]
    if m.latency is not None:
        rows += [[f"latency batch {r.batch} (median, {m.latency.threads} threads)",
                  fmt_ms(r.median_ms)] for r in m.latency.results]
    emit(_table(["metric", "value"], rows))
    if engine is not None:
        emit()
        emit(_table(
            ["layer", "sparsity", "dense b1", "CSR b1", "engine", "why"],
            [[c.name, fmt_pct(c.sparsity), f"{c.dense_us[0]:.1f} us" if c.dense_us else "-",
              f"{c.sparse_us[0]:.1f} us" if c.sparse_us else "-", c.choice, c.reason]
             for c in engine.layers]))
    return 0


def _eval_metric(args: argparse.Namespace, data: Dataset) -> tuple[str, nn.Module | None]:
    """``eval``'s quality metric (``--metric``, else accuracy, or agreement for inputs only)
    and the ``--teacher`` model teacher metrics compare with (required by them)."""
    from nncompress.measure.quality import check_metric, default_metric

    metric = args.metric or default_metric(data.labelled)
    found = check_metric(metric, labelled=data.labelled, has_teacher=True)
    if args.teacher is None:
        if found.needs_teacher(data.labelled):
            why = " (--data gives inputs only)" if not data.labelled else ""
            raise CLIError(f"metric {metric} compares with a teacher's outputs{why}: give "
                           "--teacher MODEL, e.g. the uncompressed model")
        return metric, None
    if not found.uses_teacher():
        raise CLIError(f"--teacher is for metrics that compare with a teacher's outputs, "
                       f"not {metric}")
    return metric, load_model(args.teacher, None, "--teacher")


def _sparsify(model: nn.Module, data: Dataset) -> SparsifyReport:
    """Deploy-time sparse engine on the loaded model; returns its per-layer report."""
    from nncompress.data import example_input
    from nncompress.kernels import sparsify

    return sparsify(model, example_input(data, 1), batch_sizes=(1,))[1]


HANDLERS = {"eval": _cmd_eval}
