"""The accuracy-vs-bytes Pareto plot of mixed precision against uniform widths.

Mixed precision: HAWQ (Dong, Yao, Gholami, Mahoney & Keutzer, 2019, "HAWQ: Hessian AWare
Quantization of neural networks with mixed-precision"), measured by
:func:`nncompress.quant.mixed_pareto.pareto`. :func:`plot_pareto` draws one panel per
model (test accuracy against ``.nnc`` file bytes, mixed and uniform configurations as two
series, each point labelled with its widths); :func:`pareto_section` writes the plot into
a report folder and returns the Markdown block (table + image) that
:func:`nncompress.report.write_report` takes in ``sections``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nncompress.report.plots import _save, plt
from nncompress.report.tables import fmt_bytes, fmt_pct, render_markdown

if TYPE_CHECKING:
    from nncompress.quant.mixed_pareto import Point

__all__ = ["PARETO_PNG", "pareto_section", "plot_pareto", "widths_label"]

#: file name of the plot in a report folder
PARETO_PNG = "mixed_precision_pareto.png"
#: Point.kind -> (legend label, line style)
_STYLE: dict[str, tuple[str, dict[str, str]]] = {
    "uniform": ("uniform", {"marker": "s", "linestyle": "--", "color": "tab:gray"}),
    "pinned": ("uniform, first/last 8-bit",
               {"marker": "^", "linestyle": ":", "color": "tab:orange"}),
    "mixed": ("mixed (HAWQ)", {"marker": "o", "linestyle": "-", "color": "tab:blue"})}


def widths_label(point: Point) -> str:
    """The widths in layer order, e.g. "4/2/8"."""
    return "/".join(str(b) for _, b in point.bits)


def plot_pareto(curves: Mapping[str, Sequence[Point]], path: Path,
                title: str = "Mixed precision vs uniform widths") -> Path:
    """Test accuracy (%) against bytes of the ``.nnc`` file, one panel per model (the keys
    of ``curves``), one series per kind of point (uniform, pinned, mixed) sorted by
    bytes."""
    names = list(curves)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.5 * max(1, len(names)), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for kind, (legend, style) in _STYLE.items():
            mine = sorted((p for p in curves[name] if p.kind == kind), key=lambda p: p.bytes)
            if not mine:
                continue
            ax.plot([p.bytes for p in mine], [100 * p.accuracy for p in mine], label=legend,
                    **style)
            for p in mine:
                ax.annotate(widths_label(p), (p.bytes, 100 * p.accuracy), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bytes of the .nnc file on disk")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def pareto_section(curves: Mapping[str, Sequence[Point]], out_dir: Path, *,
                   title: str = "Mixed precision vs uniform widths",
                   link: str | None = None) -> str:
    """Write :data:`PARETO_PNG` into ``out_dir`` and return a Markdown section: a table
    of every point and the image (``link``: the image's path as the Markdown should
    reference it; default its file name, for a report in ``out_dir``)."""
    plot = plot_pareto(curves, out_dir / PARETO_PNG, title)
    rows = [[name, p.label, widths_label(p), fmt_bytes(p.code_bytes), fmt_bytes(p.bytes),
             fmt_pct(p.accuracy)] for name, points in curves.items() for p in points]
    table = render_markdown(["model", "configuration", "bits per layer", "weight codes",
                             ".nnc file", "test accuracy"], rows)
    return "\n".join([
        f"## {title}", "",
        "Each quantized layer's weight width chosen by HAWQ (Dong et al. 2019: Hutchinson "
        "Hessian trace times quantization error, exact knapsack under a byte budget) against "
        "every layer at one width, with the same low-bit fine-tuning. Bits per layer in "
        "module order; weight codes: bytes the container stores for the quantized layers' "
        "codes; .nnc file: the whole file; accuracy: top-1 on the test split.", "",
        table, "", f"![mixed precision Pareto]({link or plot.name})"])
