"""Bench section: run-time model multiplexing (Eshratifar & Pedram 2020) over a model and
its compressed version on mnist1d -- a confidence cascade and a learned router, both
calibrated on a held-out split the models never saw; accuracy vs average MACs per input."""

from __future__ import annotations

from collections.abc import Callable

from nncompress.demo_multi import multiplex_markdown, multiplex_rows

SEED = 0
HOLDOUT = 0.2  # of the training split, for calibration (and router training)
BUDGETS = (0.35, 0.5, 0.75)  # fractions of the full model's MACs per sample
FIXED = (0.9, 0.99)  # a-priori confidence thresholds


def bench_multiplex(echo: Callable[[str], None]) -> str:
    rows = multiplex_rows(budgets=BUDGETS, fixed=FIXED, held_out=HOLDOUT, seed=SEED,
                          echo=echo)
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
        multiplex_markdown(rows)])
