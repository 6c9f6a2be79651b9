"""Bench section: sharing across two tasks on one input (digits 0-4 and digits 5-9) --
multi-task zipping (MTZ, He, Zhou & Thiele 2018) against two separate models, plain
averaging (the ablation) and a frozen shared backbone with a new head."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from nncompress.data import class_subset, example_input, load_dataset
from nncompress.measure import accuracy, count_macs, count_params
from nncompress.models import MLP
from nncompress.report import fmt_count, fmt_pct, render_markdown
from nncompress.share.branches import train_heads
from nncompress.share.zipping import zip_models
from nncompress.train import fit

SEED = 0
EPOCHS = 40
RETRAIN = 2  # epochs after each zipped layer
FINAL = 6  # epochs at the end


def _row(label: str, params: int, macs: int, acc: tuple[float, float],
         merged: tuple[float, float] | None, base: tuple[float, float]) -> list[str]:
    return [label, fmt_count(params), fmt_count(macs),
            "-" if merged is None else f"{fmt_pct(merged[0])} / {fmt_pct(merged[1])}",
            f"{fmt_pct(acc[0])} / {fmt_pct(acc[1])}",
            f"{(acc[0] - base[0]) * 100:+.2f} / {(acc[1] - base[1]) * 100:+.2f} pt"]


def bench_tasks(echo: Callable[[str], None]) -> str:
    digits = load_dataset("digits", seed=SEED)
    task_a = class_subset(digits, range(5), name="digits 0-4", seed=SEED)
    task_b = class_subset(digits, range(5, 10), name="digits 5-9", seed=SEED)
    echo("  two LeNet-300-100 models, digits 0-4 and digits 5-9")
    models = []
    for t, task in enumerate((task_a, task_b)):
        torch.manual_seed(SEED + t)
        m = MLP((1, 8, 8), 5)
        fit(m, task, epochs=EPOCHS, seed=SEED + t, progress=False, lr_schedule="cosine")
        models.append(m.eval())
    x1 = example_input(digits, 1)
    base = (accuracy(models[0], task_a.test), accuracy(models[1], task_b.test))
    params = sum(count_params(m).total for m in models)
    macs = sum(count_macs(m, x1).total for m in models)
    rows = [_row("two separate models", params, macs, base, None, base)]
    for share, criterion in (((1.0, 1.0), "hessian"), ((1.0, 1.0), "euclidean"),
                             ((1.0, 0.5), "hessian"), ((0.5, 0.5), "hessian")):
        echo(f"  zip share {share} ({criterion})")
        r = zip_models(models[0], models[1], task_a, task_b, share=share,
                       criterion=criterion, retrain_epochs=RETRAIN, final_epochs=FINAL,
                       seed=SEED)
        label = (f"MTZ share {share[0]:g}/{share[1]:g}"
                 + (" (Euclidean + average: ablation)" if criterion == "euclidean" else ""))
        rows.append(_row(label, r.params_after, r.macs_after, r.accuracy_after,
                         r.accuracy_merged[-1], base))
    for cut, width, label in ((3, 300, "fc1"), (5, 100, "fc1, fc2")):
        echo(f"  frozen {label} of the digits 0-4 model + a new head for digits 5-9")
        backbone = copy.deepcopy(models[0].layers[:cut])  # flatten, fc1, relu[, fc2, relu]
        heads = [copy.deepcopy(models[0].layers[cut:]), nn.Linear(width, 5)]
        branched = train_heads(backbone, heads, [task_a, task_b], epochs=EPOCHS, lr=3e-3,
                               seed=SEED)
        acc = (accuracy(branched.branch(0), task_a.test),
               accuracy(branched.branch(1), task_b.test))
        rows.append(_row(f"shared frozen {label} (from A) + head per task",
                         count_params(branched).total, count_macs(branched, x1).total, acc,
                         None, base))
    return "\n".join([
        "## Sharing across tasks: multi-task zipping (MTZ) and a shared backbone", "",
        "Two LeNet-300-100 models on one input (8x8 digits): task A = digits 0-4, task B = "
        f"digits 5-9, each trained {EPOCHS} epochs on its own classes. MTZ (He, Zhou & "
        "Thiele 2018) merges hidden neurons layer by layer with the Hessian-based cost "
        f"(share = fraction of each hidden layer merged), re-training both tasks {RETRAIN} "
        f"epochs after each layer and {FINAL} at the end. The ablation pairs neurons by "
        "Euclidean distance and averages them. The shared-backbone rows freeze task A's "
        "first hidden layer(s), keep A's remaining layers as its head and train only a new "
        "output layer (Linear) for task B on the frozen features. Parameters and MACs "
        "per input answer both tasks; accuracy A / B on each task's test split (180 "
        "samples each: one sample = 0.56 pt).", "",
        render_markdown(["model", "parameters", "MACs / input (both tasks)",
                         "acc. after merge, before re-training", "test accuracy A / B",
                         "change vs separate"], rows)])
