"""Fuzzing the .nnc reader: a few hundred seeded mutations of saved files (bit flips,
truncations, byte edits behind a recomputed checksum, structure-aware edits of shapes,
params, names, configs and module records) each load or raise a one-line FormatError,
within a time bound.

The cases come from ``bench/fuzz.py`` (which runs 10,000 of them, each in a forked child
whose peak memory it measures, for the benchmarks page)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from helpers import bench_module

CASES = 300
#: per case, seconds (the slowest seen here is about 0.2 s on a busy 2-core machine)
BOUND = 5.0


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return bench_module("fuzz.py", "nnc_fuzz")


class CaseTimeout(BaseException):
    """Raised in a case that runs past twice the bound."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(*_: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_seeded_mutations_load_or_give_one_line_errors(fuzz: ModuleType, tmp_path: Path
                                                       ) -> None:
    seeds = fuzz.seed_files(tmp_path)
    skeletons = {label: factory for label, _, factory in seeds}
    sources = [(label, path.read_bytes()) for label, path, _ in seeds]
    cases = fuzz.mutations(sources, CASES, seed=0)
    assert cases == fuzz.mutations(sources, CASES, seed=0)  # seeded
    target = tmp_path / "case.nnc"
    outcomes: dict[str, int] = {}
    for k, (label, data) in enumerate(cases):
        target.write_bytes(data)
        start = time.perf_counter()
        with deadline(2 * BOUND):
            outcome, detail = fuzz.classify(lambda label=label: fuzz.load_case(
                target, skeletons[label]))
        seconds = time.perf_counter() - start
        assert seconds < BOUND, (k, label, seconds)
        assert outcome in ("loaded", "format_error"), (k, label, outcome, detail)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # both paths are exercised: some mutations stay loadable (e.g. edited values)
    assert outcomes["loaded"] > CASES // 50 and outcomes["format_error"] > CASES // 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_bench_counts_peaks_and_markdown(fuzz: ModuleType) -> None:
    result = fuzz.bench_fuzz_files(lambda _: None, cases=12, seed=3)
    assert result["cases"] == sum(result["counts"].values()) == 12
    assert result["counts"]["other_exception"] == result["counts"]["over_time"] == 0
    assert 0 <= result["max_peak_bytes"] < 2**30 and result["max_seconds"] < BOUND
    text = fuzz.fuzz_markdown(result)
    assert "| one-line FormatError |" in text and "mlp dense" in text
    assert [title for title, _, _ in fuzz.SECTIONS] == ["Hostile .nnc files", "Hostile recipes"]
