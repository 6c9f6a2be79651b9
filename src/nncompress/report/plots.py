"""PNG plots for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nncompress.report.rows import ResultRow

if TYPE_CHECKING:
    from nncompress.prune.sensitivity import SensitivityReport


def _accuracy_scatter(rows: Sequence[ResultRow], path: Path, x_of: Callable[[ResultRow], float],
                      xlabel: str, title: str) -> Path:
    """Test accuracy (%) against ``x_of(row)`` (log scale), one colour per model, each
    point labelled with its technique."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r.model for r in rows):
        mine = sorted((r for r in rows if r.model == model), key=x_of)
        ax.plot([x_of(r) for r in mine], [100 * r.accuracy for r in mine], marker="o",
                linestyle="none", label=model)
        for r in mine:
            ax.annotate(r.technique, (x_of(r), 100 * r.accuracy), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_bytes(rows: Sequence[ResultRow], path: Path) -> Path:
    """Scatter of test accuracy (%) against artifact bytes (log scale), one colour per model."""
    return _accuracy_scatter(rows, path, lambda r: r.artifact_bytes,
                             "bytes of the .nnc file on disk (log scale)",
                             "Accuracy vs. artifact size")


def plot_accuracy_vs_macs(rows: Sequence[ResultRow], path: Path) -> Path:
    """Test accuracy (%) against MACs per sample (log scale): where structured methods land
    (fewer MACs) next to unstructured ones (same MACs)."""
    return _accuracy_scatter(rows, path, lambda r: r.macs, "MACs per sample (log scale)",
                             "Accuracy vs. compute")


def plot_layer_sparsity(layers: Mapping[str, Sequence[tuple[str, float]]], path: Path) -> Path:
    """Per-layer sparsity (% zero weights), one panel row per compressed model."""
    names = list(layers)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.8 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        entries = layers[name]
        ax.bar(range(len(entries)), [100 * s for _, s in entries], color="tab:blue")
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([n for n, _ in entries], rotation=30, ha="right", fontsize=6)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% zeros", fontsize=7)
        ax.set_title(name, fontsize=8)
    fig.suptitle("Per-layer sparsity of the weights")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sensitivity(report: SensitivityReport, path: Path) -> Path:
    """Test accuracy (%) against the pruned ratio, one line per channel group pruned alone
    (Li et al., 2017, Fig. 2), with the unpruned baseline dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in report.curves.items():
        ratios = [0.0, *(r for r, _ in points)]
        accs = [100 * report.baseline, *(100 * a for _, a in points)]
        ax.plot(ratios, accs, marker="o", label=f"{name} ({report.sizes[name]})")
    ax.axhline(100 * report.baseline, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("fraction of the group's units removed (L1 norm, no fine-tuning)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Pruning sensitivity per channel group")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)
