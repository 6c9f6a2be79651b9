"""The distillation bench section's tables (bench/distill_tables.py): verdict lines and the
figures derived from the run records, on hand-made records (no training)."""

from __future__ import annotations

from types import ModuleType

import pytest

from helpers import bench_module


@pytest.fixture(scope="module")
def mods() -> tuple[ModuleType, ModuleType]:
    jobs = bench_module("distill_jobs.py", "distill_jobs")   # distill_tables imports it
    return jobs, bench_module("distill_tables.py", "distill_tables")


def test_beats_says_when_a_gain_is_within_the_seed_spread(mods) -> None:
    _, tab = mods
    assert tab._beats([0.010, 0.012, 0.011]) == "**met**"
    assert tab._beats([0.009, 0.001, -0.005]) == "**met, but within the seed spread**"
    assert tab._beats([0.002, -0.004, -0.001]) == "**not met**"
    assert "within the seed-to-seed spread" in tab._diff([0.009, 0.001, -0.005])
    assert tab._diff([0.010, 0.012, 0.011]) == "+1.1 points (per seed +1.0, +1.2, +1.1)"


def test_kd_table_reports_the_chosen_grid_point_and_the_per_seed_gain(mods) -> None:
    jobs, tab = mods
    facts = tab.Facts(53098, (32, 64, 128), 0.957, 0.738, (16, 31, 63), (10, 19, 39), 64)
    short, long = jobs.SHORT_EPOCHS, jobs.EPOCHS
    runs = {(m, n): [jobs.StudentRun(m, s, 13185, acc + 0.001 * s) for s in jobs.SEEDS]
            for (m, n, acc) in (("labels", short, 0.92), ("kd", short, 0.91),
                                ("labels", long, 0.93), ("kd", long, 0.95))}
    grid = {tc: 0.9 for tc in jobs.GRID}
    md = tab.kd_table(facts, (0.94, grid), (4.0, 0.9), runs)
    assert "Chosen: T 4, α 0.9" in md
    assert "4.03x fewer" in md
    assert f"Target (KD beats labels, {jobs.EPOCHS} epochs): **met** -- KD − labels +2.0" in md
    assert f"at {jobs.SHORT_EPOCHS} epochs -1.0 points" in md
    assert md.count("| student cnn1d 16/31/63 |") == 4


def test_fskd_table_recovered_share_and_time_verdicts(mods) -> None:
    jobs, tab = mods
    runs = {"thinet": [jobs.FskdRun("thinet", s, 0.95, 0.55, 0.75, 311680, 153850, 70.0)
                       for s in jobs.SEEDS]}
    md = tab.fskd_table(runs)
    assert "| 50 ± 0 % |" in md                          # (0.75 - 0.55) / (0.95 - 0.55)
    assert "recovered 50 % **met**" in md
    assert "fskd 70.00 s at most **not met**" in md
    assert "2.03x fewer" in md
