"""Bench section: run-time model multiplexing (Eshratifar & Pedram 2020) over a model and
its compressed version on mnist1d -- a confidence cascade and a learned router, both
calibrated on a held-out split the models never saw; accuracy vs average MACs per input."""

from __future__ import annotations

from collections.abc import Callable

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import example_input, holdout, load_dataset
from nncompress.measure import accuracy, count_macs
from nncompress.report import fmt_count, fmt_pct, render_markdown
from nncompress.share.multiplex import calibrate_cascade, evaluate_thresholds
from nncompress.share.router import router_curve, train_router

SEED = 0
HOLDOUT = 0.2  # of the training split, for calibration (and router training)
BUDGETS = (0.35, 0.5, 0.75)  # fractions of the full model's MACs per sample
FIXED = (0.9, 0.99)  # a-priori confidence thresholds


def bench_multiplex(echo: Callable[[str], None]) -> str:
    data = load_dataset("mnist1d", seed=SEED)
    rest, held = holdout(data, HOLDOUT, seed=SEED)
    echo(f"  cnn1d trained on {1 - HOLDOUT:.0%} of the training split; thinet 4x of it")
    model, _ = zoo.load("cnn1d", rest, seed=SEED, progress=False)
    small = nc.compress(model, "thinet", rest, seed=SEED, progress=False,
                        measure_latency=False).model.eval()
    pair = [small, model.eval()]
    x1 = example_input(data, 1)
    full = count_macs(model, x1).total
    rows = [["full model alone", "-", fmt_pct(accuracy(model, data.test)), fmt_count(full),
             "100 %", "-"],
            ["thinet 4x model alone", "-", fmt_pct(accuracy(small, data.test)),
             fmt_count(count_macs(small, x1).total), "-", "-"]]
    for budget in BUDGETS:
        cascade = calibrate_cascade(pair, data, budget_macs=budget * full, calibration=held)
        point = evaluate_thresholds(pair, data, cascade.thresholds)
        rows.append([f"cascade, budget {budget:.0%}", f"{cascade.thresholds[0]:g}",
                     fmt_pct(point.accuracy), fmt_count(point.avg_macs),
                     fmt_pct(point.avg_macs / full), fmt_pct(point.share[0])])
    for threshold in FIXED:
        point = evaluate_thresholds(pair, data, (threshold,))
        rows.append([f"cascade, fixed threshold {threshold:g}", f"{threshold:g}",
                     fmt_pct(point.accuracy), fmt_count(point.avg_macs),
                     fmt_pct(point.avg_macs / full), fmt_pct(point.share[0])])
    for budget in BUDGETS:
        mux = train_router(pair, data, held, budget_macs=budget * full, seed=SEED)
        point = next(p for p in router_curve(mux, data) if p.threshold == mux.threshold)
        rows.append([f"learned router, budget {budget:.0%}", f"{mux.threshold:g}",
                     fmt_pct(point.accuracy), fmt_count(point.avg_macs),
                     fmt_pct(point.avg_macs / full), fmt_pct(point.share[0])])
    return "\n".join([
        "## Multiplexing: confidence cascade and learned router (Eshratifar & Pedram 2020)",
        "",
        f"Candidates: cnn1d trained on {1 - HOLDOUT:.0%} of the mnist1d training split and "
        f"its 4x-MAC ThiNet version; the other {HOLDOUT:.0%} is held out. Cascade: each "
        "test input goes to the small model first and moves on to the full model when the "
        "small model's top softmax probability is below the threshold (both may run). "
        "Learned router: a 40-32-2 MLP predicts from the input whether each model will be "
        "right; the input goes only to the cheapest model predicted right with probability "
        ">= threshold (router MACs included in the cost). Thresholds are calibrated on the "
        "held-out split for each budget (average MACs per input, fraction of the full "
        "model's), then measured on the test split -- the budget is met on held-out data, "
        "so a test figure may land slightly above it. Fixed-threshold rows are chosen a "
        "priori.", "",
        render_markdown(["configuration", "threshold", "test accuracy", "avg MACs / input",
                         "of full", "answered by small"], rows)])
