"""Bench section: an accuracy budget on models the recipe was not tuned on.

LeNet-300-100 (the zoo's ``mlp``) trained on digits from several seeds -- the recipe was
tuned on seed 0 only -- compressed with ``deep-compression`` as shipped and with
``max_drop=MAX_DROP`` points (a validation split carved from the training data, lossy
stages backed off until it holds; see ``nncompress.budget``). Reported: test accuracy
before and after, the drop, the ``.nnc`` bytes and ratio vs fp32 ``torch.save``, and what
the budget backed off.

Usage alone: ``python bench/budget.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import nncompress as nc
from nncompress.report import fmt_bytes, fmt_pct, fmt_ratio, render_markdown

SEEDS = (0, 1, 2, 3)
MAX_DROP = 0.5
RECIPE = "deep-compression"

BUDGET_INTRO = f"""## An accuracy budget on models the recipe was not tuned on

LeNet-300-100 (`mlp`) trained on digits from seeds {', '.join(map(str, SEEDS))} (the named
recipes were tuned on seed 0), compressed with `{RECIPE}` as shipped and with
`max_drop={MAX_DROP}` points: accuracy on a validation split of 15 % of the training
samples (the stages train on the rest; the test split decides nothing) must stay within
the budget of a reference -- the uncompressed model's, or, if lower, a control's fine-tuned
10 epochs on the rest without compression (the uncompressed model remembers the split);
lossy stages back off (sparse VD: half the KL weight; sharing: one more bit) until it
holds. Test accuracy on the 360-sample digits test split (one sample = 0.28 pt)."""


@dataclass(frozen=True)
class BudgetRow:
    seed: int
    budget: str
    before: float
    after: float
    file_bytes: int
    ratio: float
    backoffs: str


def _row(seed: int, max_drop: float | None) -> BudgetRow:
    model, data = nc.models.load("mlp", seed=seed, progress=False)
    result = nc.compress(model, RECIPE, data, seed=0, progress=False, measure_latency=False,
                         max_drop=max_drop)
    notes = [line.split("off to ", 1)[1] for line in result.log if "backing stage" in line]
    unmet = [line for line in result.log if "budget not met" in line]
    what = (f"{len(notes)} backoffs, last: {notes[-1]}" if notes else "none") + (
        "; budget not met on validation" if unmet else "")
    return BudgetRow(seed, "none" if max_drop is None else f"{max_drop:g} pt",
                     result.baseline.accuracy, result.final.accuracy,
                     result.final.artifact_bytes, result.comparison().torch_save_ratio, what)


def bench_budget(echo: Callable[[str], None]) -> list[BudgetRow]:
    rows = []
    for seed in SEEDS:
        for max_drop in (None, MAX_DROP):
            echo(f"  mlp seed {seed}, max_drop {max_drop}")
            rows.append(_row(seed, max_drop))
    return rows


def budget_markdown(rows: list[BudgetRow]) -> str:
    headers = ["model seed", "max_drop", "accuracy before", "after", "Δ", "bytes (.nnc)",
               "ratio vs fp32", "backed off"]
    cells = [[str(r.seed), r.budget, fmt_pct(r.before), fmt_pct(r.after),
              fmt_pct(r.after - r.before, signed=True), fmt_bytes(r.file_bytes),
              fmt_ratio(r.ratio), r.backoffs] for r in rows]
    return render_markdown(headers, cells)


if __name__ == "__main__":
    print(budget_markdown(bench_budget(lambda m: print(m, file=sys.stderr, flush=True))))
