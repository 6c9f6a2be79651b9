"""Write a report folder: report.md, results.json and PNG plots, published atomically.

:func:`staged_folder` builds a report in a hidden temporary folder beside its target and
renames it into place only when everything is written: an error or Ctrl-C half-way
leaves the previous report (if any) as it was and no partial folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nncompress.errors import NNCError
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
    "- **latency**: CPU wall time of the returned `nn.Module` on real test samples, median "
    "of repeated runs after warm-up, at batch 1 and batch N. **speed-up**: the uncompressed "
    "model's latency over the compressed one's, both timed in the same run, interleaved in "
    "alternating rounds (an A/B test); the baseline row's latency was timed alone, earlier, "
    "so on a shared machine it may differ from the one the speed-up used (timings drift by "
    "up to ~1.5x between minutes here).",
    "- **accuracy**: top-1 on the dataset's held-out test split.",
)


#: written into every report folder; an existing folder holding it may be replaced
REPORT_MARKER = ".nncompress-report"


class OutputError(NNCError):
    """A report folder cannot be written where it was asked for (a file is there, its
    parent folder is missing, no permission, or the folder holds something else)."""


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    markdown: Path
    json: Path
    plots: tuple[Path, ...]

    def moved(self, src: Path, dst: Path) -> ReportPaths:
        """The same files after the folder ``src`` was renamed to ``dst``."""
        def move(p: Path) -> Path:
            return dst / p.relative_to(src)
        return replace(self, markdown=move(self.markdown), json=move(self.json),
                       plots=tuple(move(p) for p in self.plots))


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
    _write_atomic(out_dir / REPORT_MARKER, f"{title}\n")
    return ReportPaths(markdown=md_path, json=json_path, plots=tuple(plots))


def _is_report(folder: Path) -> bool:
    """An empty folder, or one a report was written to (the marker, or for reports from
    before the marker both report.md and results.json)."""
    names = {p.name for p in folder.iterdir()}
    return not names or REPORT_MARKER in names or {"report.md", "results.json"} <= names


def check_report_target(target: Path) -> None:
    """Raise :class:`OutputError` unless ``target`` can become a report folder: its parent
    is an existing folder, and ``target`` is new, an empty folder or an earlier report
    (never the current folder or one above it, never a file)."""
    name = repr(str(target))
    parent = target.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a folder"
        raise OutputError(f"report folder {name}: the folder {str(parent)!r} {what}")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputError(f"report folder {name}: {exc.strerror or exc}") from None
    if mode is not None and not stat.S_ISDIR(mode):
        raise OutputError(f"report folder {name} exists and is not a folder")
    here = Path.cwd().resolve()
    if mode is not None and (target.resolve() == here or target.resolve() in here.parents):
        raise OutputError(f"report folder {name} is the current folder or one above it; "
                          "give a folder of its own")
    if mode is not None and not _is_report(target):
        raise OutputError(f"report folder {name} holds files that are not an nncompress "
                          "report; give a new folder, an empty one or an earlier report")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"report folder {name}: cannot write to {str(parent)!r} "
                          "(permission denied)")


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target`` to write a report into; when the
    block ends normally it replaces ``target`` (an earlier report there is removed only
    then). On any error or KeyboardInterrupt the staging folder is deleted and
    ``target`` is left as it was. :func:`check_report_target` is checked first."""
    check_report_target(target)
    stage = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.mkdir(stage)          # like mkdtemp, but with the umask's permissions
    except OSError as exc:
        raise OutputError(f"cannot create the report folder {str(target)!r}: "
                          f"{exc.strerror or exc}") from None
    try:
        yield stage
        _publish(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, target: Path) -> None:
    """Rename ``stage`` to ``target``; an existing ``target`` is moved aside first and
    deleted after (put back if the second rename fails)."""
    check_report_target(target)      # it may have changed while the report was built
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    had_old = target.exists()
    try:
        if had_old:
            os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            if had_old:
                os.rename(old, target)
            raise
    except OSError as exc:
        raise OutputError(f"cannot move the report into {str(target)!r}: "
                          f"{exc.strerror or exc}") from None
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


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
