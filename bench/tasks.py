"""Bench section: sharing across two tasks on one input (classes 0-4 and classes 5-9 of
one dataset) -- multi-task zipping (MTZ, He, Zhou & Thiele 2018) against two separate
models, plain averaging (the ablation) and a frozen shared backbone with a new head."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from nncompress import models as zoo
from nncompress.data import Dataset, class_subset, example_input, load_dataset
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params
from nncompress.report import fmt_bytes, fmt_count, fmt_pct, render_markdown
from nncompress.share.branches import train_heads
from nncompress.share.zipping import zip_models
from nncompress.train import fit

SEED = 0
RETRAIN = 2  # epochs after each zipped layer
FINAL = 6  # epochs at the end
#: (model, dataset, training epochs, learning rate, share settings)
PAIRS = (
    ("mlp", "digits", 40, 1e-3, ((1.0, 1.0), (1.0, 0.5), (0.5, 0.5))),
    ("cnn1d", "mnist1d", 20, 3e-3, ((1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (0.5, 0.5, 0.5))),
)


def _row(label: str, params: int, size: int, macs: int, acc: tuple[float, float],
         merged: tuple[float, float] | None, base: tuple[float, float]) -> list[str]:
    return [label, fmt_count(params), fmt_bytes(size), fmt_count(macs),
            "-" if merged is None else f"{fmt_pct(merged[0])} / {fmt_pct(merged[1])}",
            f"{fmt_pct(acc[0])} / {fmt_pct(acc[1])}",
            f"{(acc[0] - base[0]) * 100:+.2f} / {(acc[1] - base[1]) * 100:+.2f} pt"]


def _train_pair(name: str, tasks: tuple[Dataset, Dataset], epochs: int,
                lr: float) -> list[nn.Module]:
    out = []
    for t, task in enumerate(tasks):
        torch.manual_seed(SEED + t)
        m = zoo.build(name, task.input_shape, task.num_classes)
        fit(m, task, epochs=epochs, lr=lr, seed=SEED + t, progress=False,
            lr_schedule="cosine")
        out.append(m.eval())
    return out


def _pair_rows(name: str, dataset: str, epochs: int, lr: float,
               shares: tuple[tuple[float, ...], ...],
               echo: Callable[[str], None]) -> list[list[str]]:
    data = load_dataset(dataset, seed=SEED)
    tasks = (class_subset(data, range(5), seed=SEED), class_subset(data, range(5, 10),
                                                                   seed=SEED))
    echo(f"  two {name} models, {dataset} 0-4 and 5-9")
    models = _train_pair(name, tasks, epochs, lr)
    x1 = example_input(data, 1)
    base = (accuracy(models[0], tasks[0].test), accuracy(models[1], tasks[1].test))
    rows = [_row(f"{name}: two separate models", sum(count_params(m).total for m in models),
                 sum(artifact_bytes(m) for m in models),
                 sum(count_macs(m, x1).total for m in models), base, None, base)]
    settings = [(s, "hessian") for s in shares] + [(shares[0], "euclidean")]
    for share, criterion in settings:
        echo(f"  zip {name} share {share} ({criterion})")
        r = zip_models(models[0], models[1], tasks[0], tasks[1], share=share,
                       criterion=criterion, retrain_epochs=RETRAIN, final_epochs=FINAL,
                       seed=SEED)
        label = (f"{name}: MTZ share {'/'.join(f'{f:g}' for f in share)}"
                 + (" (Euclidean + average: ablation)" if criterion == "euclidean" else ""))
        rows.append(_row(label, r.params_after, artifact_bytes(r.model), r.macs_after,
                         r.accuracy_after, r.accuracy_merged[-1], base))
    return rows


def _backbone_rows(echo: Callable[[str], None]) -> list[list[str]]:
    """Frozen first layer(s) of the digits 0-4 MLP shared with a new digits 5-9 head."""
    data = load_dataset("digits", seed=SEED)
    tasks = (class_subset(data, range(5), seed=SEED), class_subset(data, range(5, 10),
                                                                   seed=SEED))
    models = _train_pair("mlp", tasks, 40, 1e-3)
    x1 = example_input(data, 1)
    base = (accuracy(models[0], tasks[0].test), accuracy(models[1], tasks[1].test))
    rows = []
    for cut, width, label in ((3, 300, "fc1"), (5, 100, "fc1, fc2")):
        echo(f"  frozen {label} of the digits 0-4 model + a new head for digits 5-9")
        backbone = copy.deepcopy(models[0].layers[:cut])  # flatten, fc1, relu[, fc2, relu]
        heads = [copy.deepcopy(models[0].layers[cut:]), nn.Linear(width, 5)]
        branched = train_heads(backbone, heads, list(tasks), epochs=40, lr=3e-3, seed=SEED)
        acc = (accuracy(branched.branch(0), tasks[0].test),
               accuracy(branched.branch(1), tasks[1].test))
        rows.append(_row(f"mlp: shared frozen {label} (from A) + head per task",
                         count_params(branched).total, artifact_bytes(branched),
                         count_macs(branched, x1).total,
                         acc, None, base))
    return rows


def bench_tasks(echo: Callable[[str], None]) -> str:
    rows = [row for pair in PAIRS for row in _pair_rows(*pair, echo=echo)]
    rows += _backbone_rows(echo)
    return "\n".join([
        "## Sharing across tasks: multi-task zipping (MTZ) and a shared backbone", "",
        "Two models of one architecture on one input: task A = classes 0-4, task B = "
        "classes 5-9 of the same dataset, each trained on its own classes (LeNet-300-100 "
        "on digits, 40 epochs; cnn1d on mnist1d, 20 epochs). MTZ (He, Zhou & Thiele 2018) "
        "merges hidden neurons / filters layer by layer with the Hessian-based cost (share "
        "= fraction of each hidden layer merged; cnn1d's BatchNorms folded first), "
        f"re-training both tasks {RETRAIN} epochs after each layer and {FINAL} at the "
        "end. The ablation pairs neurons by Euclidean distance and averages them. The "
        "shared-backbone rows freeze task A's first hidden layer(s), keep A's remaining "
        "layers as its head and train only a new output layer (Linear) for task B on the "
        "frozen features. Parameters, bytes of the .nnc file(s) (fp32, dense; the zipped "
        "model saves and loads as one file) and MACs per input answer both tasks; accuracy "
        "A / B on each task's test split (digits: 180 samples per task, one sample = "
        "0.56 pt; mnist1d: ~500).", "",
        render_markdown(["model", "parameters", "bytes on disk (.nnc)",
                         "MACs / input (both tasks)",
                         "acc. after last merge, before re-training", "test accuracy A / B",
                         "change vs separate"], rows)])
