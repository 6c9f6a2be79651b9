"""Fuzzing the recipe reader: every hostile case and a few hundred seeded mutations of
the packaged recipes give a Recipe or a one-line RecipeError, each within a time bound.

The cases come from ``bench/fuzz_recipes.py`` (which runs 10,000 of them for the
benchmarks page)."""

from __future__ import annotations

from types import ModuleType

import pytest

from helpers import bench_module

CASES = 300
#: per case, seconds; the slowest case here (10,000-deep nesting) takes about 0.2 s
BOUND = 3.0


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return bench_module("fuzz_recipes.py", "fuzz_recipes")


def test_hostile_cases_all_end_in_one_line_errors(fuzz: ModuleType) -> None:
    cases = fuzz.hostile_cases()
    assert len(cases) >= 20
    for label, text in cases:
        outcome, seconds, detail = fuzz.classify(text, BOUND)
        assert seconds < BOUND, (label, seconds)
        if label == "ANSI escape in a name":   # valid YAML, valid recipe: the CLI escapes it
            assert outcome == "valid"
            continue
        assert outcome == "recipe_error", (label, outcome, detail)


def test_seeded_mutations_give_a_recipe_or_a_one_line_error(fuzz: ModuleType) -> None:
    texts = list(fuzz.mutations(CASES, seed=0))
    assert texts == list(fuzz.mutations(CASES, seed=0))            # seeded
    outcomes: dict[str, int] = {}
    for k, text in enumerate(texts):
        outcome, _seconds, detail = fuzz.classify(text, BOUND)   # over BOUND: "over_time"
        assert outcome in ("valid", "recipe_error"), (k, outcome, detail, text[:300])
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the mutations exercise both paths, not just one
    assert outcomes["valid"] > CASES // 10 and outcomes["recipe_error"] > CASES // 10


def test_bench_counts_and_markdown(fuzz: ModuleType) -> None:
    messages: list[str] = []
    result = fuzz.bench_fuzz_recipes(messages.append, cases=40, seed=1)
    counts = result["counts"]
    assert sum(counts.values()) == result["cases"] == 40 + len(fuzz.hostile_cases())
    assert counts["other_exception"] == 0 and counts["over_time"] == 0
    assert 0 < result["max_seconds"] < BOUND
    text = fuzz.fuzz_recipes_markdown(result)
    assert "| one-line RecipeError |" in text and "| billion laughs | recipe_error |" in text
    assert "\x1b" not in text and messages
