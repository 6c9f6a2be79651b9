"""The main job: train (or load from cache) every reference model on its bundled dataset,
compress each with every demo recipe, print one table and write a report folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from nncompress.data import Dataset
from nncompress.errors import ConstraintError, UnsupportedLayerError
from nncompress.report import ReportPaths, ResultRow, rows_text, write_report
from nncompress.report.deployed import deployed_section, deployed_text
from nncompress.report.writer import staged_folder

if TYPE_CHECKING:
    from nncompress.demo_deploy import DeployedLatency
    from nncompress.recipe import Recipe

#: recipe -> the reference models the demo shows it on: each family once, on the models
#: where it matters (every model x every recipe is `make bench`'s job)
DEMO_PLAN: dict[str, tuple[str, ...]] = {
    "magnitude-prune": ("mlp", "cnn2d"),
    "deep-compression": ("mlp", "cnn1d"),
    "l1-filter-prune": ("cnn1d", "gru", "rescnn"),
    "low-rank": ("lstm", "transformer"),
    "layer-prune": ("rescnn", "transformer"),
    "int8": ("cnn1d", "gru", "transformer"),
    "lowbit": ("cnn1d",),
    "binarize": ("mlp",),
}
DEMO_RECIPES: tuple[str, ...] = tuple(DEMO_PLAN)
#: the model whose per-group pruning sensitivity the report plots
SENSITIVITY_MODEL = "cnn1d"
QUICK_EPOCHS = 1
#: the model whose mixed-precision vs uniform-bits Pareto plot the report shows
PARETO_MODEL = "mlp"
#: the recipe whose per-stage bytes table (Han et al. 2015, Table 1 style) the report shows
BREAKDOWN_RECIPE = "deep-compression"


@dataclass(frozen=True)
class Skipped:
    """A recipe that does not apply to a model, and the one-line reason it gave."""

    model: str
    recipe: str
    reason: str


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it wrote it; ``deployed``: per row (model,
    technique) its deployed form timed next to eager PyTorch."""

    rows: tuple[ResultRow, ...]
    skipped: tuple[Skipped, ...]
    report: ReportPaths
    seconds: float
    deployed: tuple[tuple[str, str, DeployedLatency], ...] = ()


def run_demo(out_dir: Path, *, models: Sequence[str] | None = None,
             recipes: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
             progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the main job and write ``report.md``, ``results.json`` and plots to ``out_dir``.

    By default each model runs the recipes :data:`DEMO_PLAN` lists it under; ``recipes``
    runs those on every selected model instead.

    The folder is built beside ``out_dir`` and renamed into place at the end
    (:func:`~nncompress.report.writer.staged_folder`): an error or Ctrl-C half-way leaves
    no partial report, and an earlier report in ``out_dir`` is replaced only then.
    ``quick`` trains 1 epoch per model (a smoke run, not for reading accuracies).
    """
    from nncompress import models as zoo
    from nncompress.recipe import Recipe

    start = time.perf_counter()
    names = list(models) if models else list(zoo.model_names())
    for name in names:
        zoo.spec(name)  # unknown names fail before any work starts
    wanted = recipes if recipes is not None else DEMO_RECIPES
    plans = [Recipe.resolve(r) for r in wanted]
    chosen = {name: [p for p in plans if recipes is not None or name in DEMO_PLAN[p.name]]
              for name in names}
    deployed: list[tuple[str, str, DeployedLatency]] = []
    with staged_folder(out_dir) as stage:
        rows, skipped, sparsity, sections = _run_models(chosen, stage, quick=quick,
                                                        seed=seed, progress=progress,
                                                        echo=echo, deployed=deployed)
        echo("")
        echo(rows_text(rows))
        echo("")
        echo(deployed_text(deployed))
        seconds = time.perf_counter() - start
        paths = write_report(stage, "nncompress demo", rows, sparsity,
                             extra={"seconds": seconds, "quick": quick, "seed": seed,
                                    "skipped": [vars(k) for k in skipped],
                                    "deployed": [{"model": m, "technique": t, **d.to_json()}
                                                 for m, t, d in deployed]},
                             sections=[deployed_section(deployed), *sections])
    paths = paths.moved(stage, out_dir)
    echo(f"\nreport written to {paths.markdown} ({seconds:.0f} s)")
    return DemoResult(rows=tuple(rows), skipped=tuple(skipped), report=paths,
                      seconds=seconds, deployed=tuple(deployed))


def _run_models(chosen: dict[str, list[Recipe]], out_dir: Path, *,
                quick: bool, seed: int, progress: bool, echo: Callable[[str], None],
                deployed: list[tuple[str, str, DeployedLatency]]
                ) -> tuple[list[ResultRow], list[Skipped], dict[str, list[tuple[str, float]]],
                           list[str]]:
    """Every model with its recipes (files into ``out_dir``); returns the rows, the
    refusals, per-layer sparsity for the plot and the report's extra sections; each row's
    deployed form timed next to eager PyTorch goes into ``deployed``."""
    from nncompress import api
    from nncompress import models as zoo
    from nncompress.demo_deploy import deploy_and_time

    rows: list[ResultRow] = []
    sparsity: dict[str, list[tuple[str, float]]] = {}
    model_dir = out_dir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[Skipped] = []
    sections: list[str] = []
    stage_bytes: list[str] = []
    names = list(chosen)
    for i, name in enumerate(names, 1):
        echo(f"[{i}/{len(names)}] {name}: training or loading from cache")
        model, data = zoo.load(name, seed=seed, progress=progress,
                               epochs=QUICK_EPOCHS if quick else None)
        if name == SENSITIVITY_MODEL:
            echo(f"[{i}/{len(names)}] {name}: pruning sensitivity per channel group")
            sections.append(_sensitivity_section(model, data, out_dir))
        if name == PARETO_MODEL:
            echo(f"[{i}/{len(names)}] {name}: mixed precision vs uniform bits (Pareto)")
            sections.append(_pareto_section(name, model, data, out_dir, quick=quick,
                                            seed=seed))
        baseline = api.measure(model, data)  # one baseline for every recipe's row
        rows.append(ResultRow.build(name, data.name, "baseline (fp32)", baseline, baseline))
        echo(f"[{i}/{len(names)}] {name}: deployed forms (ONNX, C) vs eager")
        deployed.append((name, "baseline (fp32)",
                         deploy_and_time(model, data, model_dir / f"{name}-baseline")))
        for recipe in chosen[name]:
            echo(f"[{i}/{len(names)}] {name}: compressing with {recipe.name}")
            try:
                result = api.compress(model, recipe, data, seed=seed, progress=progress,
                                      baseline=baseline)
            except (UnsupportedLayerError, ConstraintError) as exc:
                echo(f"[{i}/{len(names)}] {name}: {recipe.name} does not apply: {exc}")
                skipped.append(Skipped(name, recipe.name, str(exc)))
                continue
            rows.append(ResultRow.build(name, data.name, recipe.name, result.baseline,
                                        result.final))
            nnc = model_dir / f"{name}-{recipe.name}.nnc"
            api.save(result, nnc)
            deployed.append((name, recipe.name, deploy_and_time(
                result.model, data, model_dir / f"{name}-{recipe.name}", nnc=nnc)))
            if recipe.name == BREAKDOWN_RECIPE:
                stage_bytes.append(result.bytes_table(markdown=True))
            layers = [(layer.name, 1 - layer.nonzero_params / layer.params)
                      for layer in result.final.macs.layers if layer.params]
            if any(zeros > 0.01 for _, zeros in layers):
                sparsity[f"{name} / {recipe.name}"] = layers
    from nncompress.demo_multi import demo_sections

    echo("several models at once: zipping and multiplexing")
    sections += demo_sections(names, quick=quick, seed=seed, echo=echo)
    from nncompress.demo_distill import demo_sections as distill_sections

    sections += distill_sections(names, quick=quick, seed=seed, echo=echo)
    sections += [*_breakdown_section(stage_bytes),
                 *([_skipped_section(skipped)] if skipped else [])]
    return rows, skipped, sparsity, sections


def _pareto_section(name: str, model: nn.Module, data: Dataset, out_dir: Path, *,
                    quick: bool, seed: int) -> str:
    """Accuracy against bytes of weight codes: uniform 3 / 4-bit weights and mixed
    precision (HAWQ) at those two byte budgets (``mixed_precision``, 1 epoch each)."""
    from nncompress.quant.mixed import MixedPrecisionConfig
    from nncompress.quant.mixed_pareto import pareto, uniform_bytes
    from nncompress.report.pareto import pareto_section

    config = MixedPrecisionConfig(average_bits=4.0, epochs=1 if not quick else 0)
    budgets = [uniform_bytes(model, data, bits, config) for bits in (3, 4)]
    points = pareto(model, data, budgets, uniform=(3, 4), config=config, seed=seed)
    return pareto_section({name: points}, out_dir)


def _breakdown_section(tables: Sequence[str]) -> list[str]:
    if not tables:
        return []
    return ["\n\n".join([
        f"## {BREAKDOWN_RECIPE}: bytes per stage",
        "Han et al. (2015), Table 1 style: each weight tensor's bytes at the baseline and "
        "after every technique stage in its best plain lossless encoding (sparse / "
        "relative-index / codebook indices), then with Huffman-coded encodings allowed "
        "(what the .nnc file stores).", *tables])]


def _skipped_section(skipped: Sequence[Skipped]) -> str:
    lines = ["## Not applicable", "",
             "Recipes that refused a model, with the reason they gave (nothing is skipped "
             "silently):", ""]
    lines += [f"- **{k.model}** / `{k.recipe}`: {k.reason}" for k in skipped]
    return "\n".join(lines)


def _sensitivity_section(model: nn.Module, data: Dataset, out_dir: Path) -> str:
    """Li et al. (2017)-style sensitivity: each channel group pruned alone (L1, no
    fine-tuning) at several ratios; a plot and a table for the report."""
    from nncompress.prune.sensitivity import sensitivity
    from nncompress.report import fmt_pct, render_markdown
    from nncompress.report.plots import plot_sensitivity

    rep = sensitivity(model, data, ratios=(0.25, 0.5, 0.75))
    plot = plot_sensitivity(rep, out_dir / f"sensitivity_{SENSITIVITY_MODEL}.png")
    ratios = sorted({r for points in rep.curves.values() for r, _ in points})
    rows = [[name, *(fmt_pct(dict(points).get(r)) for r in ratios)]
            for name, points in rep.curves.items()]
    table = render_markdown(["group", *(f"{r:.0%} removed" for r in ratios)], rows)
    return "\n".join([
        f"## Pruning sensitivity ({SENSITIVITY_MODEL})", "",
        f"Test accuracy after removing a fraction of one channel group's units by L1 norm, "
        f"that group alone, no fine-tuning (baseline {fmt_pct(rep.baseline)}). Flat curves "
        "mark groups that can be pruned hard; `ratios_for_target` turns this into "
        "per-group ratios for a global target.", "", table, "", f"![sensitivity]({plot.name})"])
