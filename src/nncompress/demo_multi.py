"""Demo sections that work on several models at once: multi-task zipping (MTZ) of two
task models on one input, and run-time multiplexing of a model and its compressed
version. ``make demo`` shows a short version of each; ``make bench`` the full tables
with ablations (``bench/tasks.py``, ``bench/multiplex.py`` call these functions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nncompress.data import Dataset, class_subset, example_input, holdout, load_dataset
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params
from nncompress.report import fmt_bytes, fmt_count, fmt_pct, render_markdown
from nncompress.train import fit

__all__ = ["CostRow", "ZipRow", "demo_sections", "multiplex_markdown", "multiplex_rows",
           "task_pair", "zip_markdown", "zip_rows"]

#: the reference models zipped in the demo: (model, dataset, epochs, learning rate)
ZIP_MODELS = (("mlp", "digits", 40, 1e-3), ("cnn1d", "mnist1d", 20, 3e-3))


@dataclass(frozen=True)
class ZipRow:
    """Two task models (A: classes 0-4, B: classes 5-9) separately or zipped."""

    label: str
    params: int
    file_bytes: int
    macs: int
    accuracy: tuple[float, float]
    merged: tuple[float, float] | None  # right after the last merge, before re-training
    base: tuple[float, float]


@dataclass(frozen=True)
class CostRow:
    """One multiplexing configuration: test accuracy and average MACs per input."""

    label: str
    threshold: float | None
    accuracy: float
    avg_macs: float
    full_macs: int
    small_share: float | None


def task_pair(name: str, dataset: str, *, epochs: int, lr: float,
              seed: int = 0) -> tuple[list[nn.Module], tuple[Dataset, Dataset]]:
    """Model ``name`` trained on classes 0-4 and, separately, on classes 5-9 of
    ``dataset`` (same input): the two tasks of a zipping experiment."""
    from nncompress import models as zoo

    data = load_dataset(dataset, seed=seed)
    tasks = (class_subset(data, range(5), seed=seed),
             class_subset(data, range(5, 10), seed=seed))
    trained = []
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + t)
        model = zoo.build(name, task.input_shape, task.num_classes)
        fit(model, task, epochs=epochs, lr=lr, seed=seed + t, progress=False,
            lr_schedule="cosine")
        trained.append(model.eval())
    return trained, tasks


def zip_rows(name: str, dataset: str, *, epochs: int, lr: float,
             settings: Sequence[tuple[float | Sequence[float], str]], retrain: int,
             final: int, seed: int = 0,
             echo: Callable[[str], None] = print) -> list[ZipRow]:
    """The separate pair, then one zipped model per ``(share, criterion)`` setting."""
    from nncompress.share.zipping import zip_models

    echo(f"  zipping: two {name} models on {dataset}, classes 0-4 and 5-9")
    pair, tasks = task_pair(name, dataset, epochs=epochs, lr=lr, seed=seed)
    x1 = example_input(tasks[0], 1)
    base = (accuracy(pair[0], tasks[0].test), accuracy(pair[1], tasks[1].test))
    rows = [ZipRow(f"{name}: two separate models", sum(count_params(m).total for m in pair),
                   sum(artifact_bytes(m) for m in pair),
                   sum(count_macs(m, x1).total for m in pair), base, None, base)]
    for share, criterion in settings:
        r = zip_models(pair[0], pair[1], tasks[0], tasks[1], share=share,
                       criterion=criterion, retrain_epochs=retrain, final_epochs=final,
                       seed=seed)
        shares = "/".join(f"{f:g}" for f in (share if isinstance(share, Sequence)
                                              else [share]))
        label = (f"{name}: MTZ share {shares}"
                 + (" (Euclidean + average: ablation)" if criterion == "euclidean" else ""))
        rows.append(ZipRow(label, r.params_after, artifact_bytes(r.model), r.macs_after,
                           r.accuracy_after, r.accuracy_merged[-1], base))
    return rows


def zip_markdown(rows: Sequence[ZipRow]) -> str:
    def pct2(pair: tuple[float, float] | None) -> str:
        return "-" if pair is None else f"{fmt_pct(pair[0])} / {fmt_pct(pair[1])}"

    cells = [[r.label, fmt_count(r.params), fmt_bytes(r.file_bytes), fmt_count(r.macs),
              pct2(r.merged), pct2(r.accuracy),
              f"{(r.accuracy[0] - r.base[0]) * 100:+.2f} / "
              f"{(r.accuracy[1] - r.base[1]) * 100:+.2f} pt"] for r in rows]
    return render_markdown(["model", "parameters", "bytes on disk (.nnc)",
                            "MACs / input (both tasks)",
                            "acc. after last merge, before re-training",
                            "test accuracy A / B", "change vs separate"], cells)


def multiplex_rows(*, budgets: Sequence[float], fixed: Sequence[float] = (),
                   held_out: float = 0.2, seed: int = 0, epochs: int | None = None,
                   echo: Callable[[str], None] = print) -> list[CostRow]:
    """cnn1d trained on ``1 - held_out`` of mnist1d's training split and its 4x-MAC
    ThiNet version, multiplexed by a confidence cascade and by a learned router, each
    calibrated on the held-out part for every budget (fraction of the full model's MACs
    per input); ``fixed`` cascade thresholds are added as chosen a priori. ``epochs``
    overrides cnn1d's training epochs (a quick smoke run)."""
    from nncompress import api
    from nncompress import models as zoo
    from nncompress.share.multiplex import calibrate_cascade, evaluate_thresholds
    from nncompress.share.router import router_curve, train_router

    data = load_dataset("mnist1d", seed=seed)
    rest, held = holdout(data, held_out, seed=seed)
    echo(f"  multiplexing: cnn1d on {1 - held_out:.0%} of mnist1d's training split and "
         "its 4x ThiNet version")
    model, _ = zoo.load("cnn1d", rest, seed=seed, progress=False, epochs=epochs)
    small = api.compress(model, "thinet", rest, seed=seed, progress=False,
                         measure_latency=False).model.eval()
    pair = [small, model.eval()]
    x1 = example_input(data, 1)
    full = count_macs(model, x1).total
    rows = [CostRow("full model alone", None, accuracy(model, data.test), full, full, None),
            CostRow("thinet 4x model alone", None, accuracy(small, data.test),
                    count_macs(small, x1).total, full, 1.0)]
    for budget in budgets:
        cascade = calibrate_cascade(pair, data, budget_macs=budget * full, calibration=held)
        p = evaluate_thresholds(pair, data, cascade.thresholds)
        rows.append(CostRow(f"cascade, budget {budget:.0%}", p.thresholds[0], p.accuracy,
                            p.avg_macs, full, p.share[0]))
    for threshold in fixed:
        p = evaluate_thresholds(pair, data, (threshold,))
        rows.append(CostRow(f"cascade, fixed threshold {threshold:g}", threshold,
                            p.accuracy, p.avg_macs, full, p.share[0]))
    for budget in budgets:
        mux = train_router(pair, data, held, budget_macs=budget * full, seed=seed)
        p = next(q for q in router_curve(mux, data) if q.threshold == mux.threshold)
        rows.append(CostRow(f"learned router, budget {budget:.0%}", p.threshold, p.accuracy,
                            p.avg_macs, full, p.share[0]))
    return rows


def multiplex_markdown(rows: Sequence[CostRow]) -> str:
    cells = [[r.label, "-" if r.threshold is None else f"{r.threshold:g}",
              fmt_pct(r.accuracy), fmt_count(r.avg_macs), fmt_pct(r.avg_macs / r.full_macs),
              "-" if r.small_share is None else fmt_pct(r.small_share)] for r in rows]
    return render_markdown(["configuration", "threshold", "test accuracy",
                            "avg MACs / input", "of full", "answered by small"], cells)


def demo_sections(names: Sequence[str], *, quick: bool, seed: int,
                  echo: Callable[[str], None]) -> list[str]:
    """The short versions shown in ``make demo`` for the reference models in ``names``:
    full zipping of each pair, and both multiplexers at two budgets (needs cnn1d)."""
    sections = []
    rows: list[ZipRow] = []
    for name, dataset, epochs, lr in ZIP_MODELS:
        if name in names:
            rows += zip_rows(name, dataset, epochs=1 if quick else epochs, lr=lr,
                             settings=[(1.0, "hessian")], retrain=0 if quick else 2,
                             final=1 if quick else 6, seed=seed, echo=echo)
    if rows:
        sections.append("\n\n".join([
            "## Sharing across tasks: multi-task zipping (MTZ)",
            "He, Zhou & Thiele (2018): two models of one architecture on one input (task A "
            "= classes 0-4, task B = classes 5-9), every hidden layer's neurons / filters "
            "merged pairwise by the Hessian-based cost, then both tasks re-trained. "
            "Parameters, .nnc bytes and MACs answer both tasks. `make bench` adds partial "
            "sharing and the Euclidean ablation.",
            zip_markdown(rows)]))
    if "cnn1d" in names:
        costs = multiplex_rows(budgets=(0.35, 0.5), seed=seed, echo=echo,
                               epochs=1 if quick else None)
        sections.append("\n\n".join([
            "## Multiplexing: confidence cascade and learned router",
            "Eshratifar & Pedram (2020): each mnist1d test input goes to the 4x-pruned "
            "cnn1d or to the full one, chosen by the small model's confidence (cascade) or "
            "by a 40-32-2 MLP router; thresholds calibrated on a held-out 20 % of the "
            "training split for each budget of average MACs per input.",
            multiplex_markdown(costs)]))
    return sections
