"""Bench section: a confidence cascade over a model and its compressed versions
(Eshratifar & Pedram 2020): accuracy vs average MACs per input on mnist1d."""

from __future__ import annotations

from collections.abc import Callable

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import example_input
from nncompress.measure import accuracy, count_macs
from nncompress.report import fmt_count, fmt_pct, render_markdown
from nncompress.share.multiplex import calibrate_cascade, cascade_curve, evaluate_thresholds

SEED = 0
BUDGETS = (0.35, 0.5, 0.75)  # fractions of the full model's MACs per sample
FIXED = (0.9, 0.99, 0.999)  # a-priori confidence thresholds


def bench_multiplex(echo: Callable[[str], None]) -> str:
    model, data = zoo.load("cnn1d", "mnist1d", seed=SEED, progress=False)
    echo("  cnn1d cascade: 4x-pruned thinet model -> full model")
    small = nc.compress(model, "thinet", data, seed=SEED, progress=False,
                        measure_latency=False).model
    pair = [small.eval(), model.eval()]
    full = count_macs(model, example_input(data, 1)).total
    rows = [["full model alone", "-", fmt_pct(accuracy(model, data.test)), fmt_count(full),
             "100 %", "-"],
            ["thinet 4x model alone", "-", fmt_pct(accuracy(small, data.test)),
             fmt_count(count_macs(small, example_input(data, 1)).total), "-", "-"]]
    test_points = {p.thresholds: p for p in cascade_curve(pair, data)}
    for budget in BUDGETS:
        cascade = calibrate_cascade(pair, data, budget_macs=budget * full)
        point = test_points.get(cascade.thresholds)
        acc = accuracy(cascade, data.test)
        rows.append([f"cascade, budget {budget:.0%} of full MACs",
                     f"{cascade.thresholds[0]:g}", fmt_pct(acc),
                     fmt_count(point.avg_macs) if point else "-",
                     fmt_pct(point.avg_macs / full) if point else "-",
                     fmt_pct(point.share[0]) if point else "-"])
    for threshold in FIXED:
        point = evaluate_thresholds(pair, data, (threshold,))
        rows.append([f"cascade, fixed threshold {threshold:g}", f"{threshold:g}",
                     fmt_pct(point.accuracy), fmt_count(point.avg_macs),
                     fmt_pct(point.avg_macs / full), fmt_pct(point.share[0])])
    return "\n".join([
        "## Multiplexing: confidence cascade (Eshratifar & Pedram 2020)", "",
        "Each mnist1d test input goes to the 4x-pruned ThiNet cnn1d first and moves on to "
        "the full cnn1d when the small model's top softmax probability is below the "
        "threshold; thresholds are calibrated on the training split for each budget "
        "(average MACs per input), then measured on the test split. The reference models "
        "fit their training data almost perfectly, so the small model looks sure of every "
        "training input and calibration on the training split always picks it alone -- "
        "a held-out calibration split is needed (not built yet). Rows with fixed "
        "thresholds (chosen a priori, not on the test set) show the trade-off the cascade "
        "offers.", "",
        render_markdown(["configuration", "threshold", "test accuracy", "avg MACs / input",
                         "of full", "answered by small"], rows)])
