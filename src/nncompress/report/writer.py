"""Write a report folder: report.md, results.json and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nncompress.report.plots import (
    plot_accuracy_vs_bytes,
    plot_accuracy_vs_macs,
    plot_layer_sparsity,
)
from nncompress.report.rows import ResultRow, rows_markdown

MEASUREMENT_NOTES = (
    "- **bytes on disk**: size of the `.nnc` file `nc.save` writes (each tensor in the "
    "smallest lossless encoding it earned); **ratio** = baseline bytes / compressed bytes.",
    "- **MACs**: multiply-accumulates per sample of weight layers and attention matmuls; "
    "**nz MACs** counts only MACs with non-zero weights (what a sparse kernel could skip).",
    "- **latency**: CPU wall time of the returned `nn.Module`, median of repeated runs after "
    "warm-up, at batch 1 and batch N; **speed-up** = baseline latency / compressed latency. "
    "On a shared machine timings drift between runs (up to ~1.3x here); `make bench` times "
    "the models it compares interleaved, which is the figure to trust.",
    "- **accuracy**: top-1 on the dataset's held-out test split.",
)


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    markdown: Path
    json: Path
    plots: tuple[Path, ...]


def environment() -> dict[str, Any]:
    """Facts that the numbers depend on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def write_report(out_dir: Path, title: str, rows: Sequence[ResultRow],
                 layer_sparsity: Mapping[str, Sequence[tuple[str, float]]],
                 extra: Mapping[str, Any] | None = None,
                 sections: Sequence[str] = ()) -> ReportPaths:
    """Write ``report.md``, ``results.json``, ``accuracy_vs_bytes.png``,
    ``accuracy_vs_macs.png`` and ``layer_sparsity.png`` into ``out_dir`` (created if
    missing).

    ``sections`` are extra Markdown blocks (each starting with its own ``##`` heading),
    placed after the results table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_accuracy_vs_bytes(rows, out_dir / "accuracy_vs_bytes.png"),
             plot_accuracy_vs_macs(rows, out_dir / "accuracy_vs_macs.png")]
    if layer_sparsity:
        plots.append(plot_layer_sparsity(layer_sparsity, out_dir / "layer_sparsity.png"))
    env = environment()
    payload = {"title": title, "environment": env, "rows": [r.to_json() for r in rows],
               "layer_sparsity": {k: list(map(list, v)) for k, v in layer_sparsity.items()},
               **(dict(extra) if extra else {})}
    json_path = _write_atomic(out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    md = [f"# {title}", "", rows_markdown(list(rows)), ""]
    for block in sections:
        md += [block.rstrip(), ""]
    md += ["## How these were measured", "",
          *MEASUREMENT_NOTES, "",
          f"Environment: torch {env['torch']}, {env['threads']} threads, "
          f"Python {env['python']}, {env['machine']}, {env['cpus']} CPUs.", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md_path = _write_atomic(out_dir / "report.md", "\n".join(md) + "\n")
    return ReportPaths(markdown=md_path, json=json_path, plots=tuple(plots))


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
