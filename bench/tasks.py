"""Bench section: sharing across two tasks on one input (classes 0-4 and classes 5-9 of
one dataset) -- multi-task zipping (MTZ, He, Zhou & Thiele 2018) against two separate
models, plain averaging (the ablation) and a frozen shared backbone with a new head."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from nncompress.data import example_input
from nncompress.demo_multi import ZIP_MODELS, ZipRow, task_pair, zip_markdown, zip_rows
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params
from nncompress.share.branches import train_heads

SEED = 0
RETRAIN = 2  # epochs after each zipped layer
FINAL = 6  # epochs at the end
SHARES = {"mlp": ((1.0, 1.0), (1.0, 0.5), (0.5, 0.5)),
          "cnn1d": ((1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (0.5, 0.5, 0.5))}


def _backbone_rows(echo: Callable[[str], None]) -> list[ZipRow]:
    """Frozen first layer(s) of the digits 0-4 MLP shared with a new digits 5-9 head."""
    name, dataset, epochs, lr = ZIP_MODELS[0]
    pair, tasks = task_pair(name, dataset, epochs=epochs, lr=lr, seed=SEED)
    x1 = example_input(tasks[0], 1)
    base = (accuracy(pair[0], tasks[0].test), accuracy(pair[1], tasks[1].test))
    rows = []
    for cut, width, label in ((3, 300, "fc1"), (5, 100, "fc1, fc2")):
        echo(f"  frozen {label} of the digits 0-4 model + a new head for digits 5-9")
        backbone = copy.deepcopy(pair[0].layers[:cut])  # flatten, fc1, relu[, fc2, relu]
        heads = [copy.deepcopy(pair[0].layers[cut:]), nn.Linear(width, 5)]
        branched = train_heads(backbone, heads, list(tasks), epochs=epochs, lr=3e-3,
                               seed=SEED)
        acc = (accuracy(branched.branch(0), tasks[0].test),
               accuracy(branched.branch(1), tasks[1].test))
        rows.append(ZipRow(f"mlp: shared frozen {label} (from A) + head per task",
                           count_params(branched).total, artifact_bytes(branched),
                           count_macs(branched, x1).total, acc, None, base))
    return rows


def bench_tasks(echo: Callable[[str], None]) -> str:
    rows: list[ZipRow] = []
    for name, dataset, epochs, lr in ZIP_MODELS:
        settings = [(s, "hessian") for s in SHARES[name]] + [(SHARES[name][0], "euclidean")]
        rows += zip_rows(name, dataset, epochs=epochs, lr=lr, settings=settings,
                         retrain=RETRAIN, final=FINAL, seed=SEED, echo=echo)
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
        "model saves and loads as one file) and MACs per input answer both tasks; "
        "accuracy A / B on each task's test split (digits: 180 samples per task, one "
        "sample = 0.56 pt; mnist1d: ~500).", "",
        zip_markdown(rows)])
