"""Bench section: knowledge distillation and label-free compression (issue 11's targets).

Six experiments, each a Markdown table of mean +- sample std over seeds 0, 1, 2 at equal
training budgets: (1) a 4x smaller cnn1d student trained from labels vs by KD (Hinton,
Vinyals & Dean 2015), T and alpha chosen on a validation split; (2) TAKD (Mirzadeh et al.
2020) vs direct KD for a 10x smaller student; (3) FSKD (Li et al. 2020) after 2x-MAC
structured pruning; (4) KD vs cross-entropy fine-tuning inside Deep Compression and int8
QAT; (5) MobileDA (Yang et al. 2020) on a shifted mnist1d; (6) the transformer embedder
compressed from inputs only. The runs (:mod:`distill_jobs`) go to a pool of
:data:`WORKERS` spawned processes with one torch thread each.

Usage: ``python bench/run.py --only distill --out /tmp/distill.md``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import distill_jobs as J
import distill_tables as tab
from nncompress import models as zoo
from nncompress.data import load_dataset
from nncompress.data.domains import SHIFTED_NAME
from nncompress.models.students import student_of
from nncompress.train import evaluate

__all__ = ["DISTILL_INTRO", "section"]

WORKERS = 2
Echo = Callable[[str], None]

DISTILL_INTRO = f"""## Knowledge distillation and label-free compression

Every table gives mean ± sample standard deviation over seeds {", ".join(map(str, J.SEEDS))}
(the seed sets the student's initialisation, the batch order and every sampled input).
The teacher throughout is the reference cnn1d trained on mnist1d's labels
(`nc.models.load("cnn1d", dataset="mnist1d")`); students are `student_of(teacher,
size_ratio, kind="{J.KIND}")` -- the width multiplier (Howard et al. 2017), `student_of`'s own
choice for cnn1d: trained from labels it matched the MobileNet and ShuffleNet students and
keeps the teacher's layers one to one. Training: Adam, lr {J.LR}, batch 128, {J.SCHEDULE}
decay, the same loop (`nncompress.train.fit`) for labels and KD; KD is Hinton, Vinyals &
Dean (2015): α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE. The runs go to
{WORKERS} worker processes, one torch thread each, so stage times are single-thread times."""


def _prepare(echo: Echo) -> tab.Facts:
    """Train / generate whatever is not cached yet, once, before the workers read it."""
    echo("  distill: reference models and datasets (cached after the first run)")
    teacher, data = J.cnn1d()
    zoo.load("mlp", "digits", seed=0, progress=False)
    transformer, _ = zoo.load("transformer", "mnist1d", seed=0, progress=False)
    target = load_dataset(SHIFTED_NAME)
    return tab.Facts(
        J.n_params(teacher), tuple(teacher.arch_config()["channels"]),
        evaluate(teacher, data.test), evaluate(teacher, target.test),
        tuple(student_of(teacher, J.RATIO, kind=J.KIND).arch_config()["channels"]),
        tuple(student_of(teacher, J.TA_RATIO, kind=J.KIND).arch_config()["channels"]),
        transformer.arch_config()["dim"])


class _Inline(Executor):
    """An executor that runs each job at once in this process (``workers=0``: debugging,
    or constants patched in this process)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller through the future
            future.set_exception(exc)
        return future


class _Pool:
    """Submits jobs to the worker pool and echoes each as it finishes."""

    def __init__(self, pool: Executor, echo: Echo) -> None:
        self.pool, self.echo, self.start = pool, echo, time.perf_counter()

    def submit(self, label: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda f: self.echo(
            f"  distill: {label} done ({time.perf_counter() - self.start:.0f} s)"
            if f.exception() is None else f"  distill: {label} FAILED: {f.exception()}"))
        return future


def _resolve(jobs: Any) -> Any:
    """``jobs`` with every Future replaced by its result (lists and dicts kept)."""
    if isinstance(jobs, Future):
        return jobs.result()
    if isinstance(jobs, dict):
        return {k: _resolve(v) for k, v in jobs.items()}
    return [_resolve(v) for v in jobs]


# ------------------------------------------------------------ the section


def _independent(run: _Pool) -> dict[str, Any]:
    """Submit the jobs that need neither the validation teacher nor the grid's choice."""
    s = J.SEEDS
    return {
        "embed": {r: [run.submit(f"embedder {r} seed {i}", J.embedder_run, r, i) for i in s]
                  for r in J.EMBEDDER_RECIPES},
        "tune": {(m, r, t): [run.submit(f"{m} {r} teacher {t} seed {i}", J.tune_run, m, d, r,
                                        t, i) for i in s]
                 for m, d, r in J.FINE_TUNE for t in ("original", "none")},
        "domain": {m: [run.submit(f"domain {m} seed {i}", J.domain_run, m, i) for i in s]
                   for m in J.DOMAIN_METHODS},
        "fskd": {p: [run.submit(f"fskd after {p} seed {i}", J.fskd_run, p, i) for i in s]
                 for p in J.PRUNERS},
    }


def _labels(run: _Pool) -> dict[str, Any]:
    """Submit the students trained from labels (they fill the pool while the grid ends)."""
    s = J.SEEDS
    return {
        "students": {("labels", n): [run.submit(f"labels {n} epochs seed {i}", J.student_run,
                                                "labels", i, J.RATIO, n) for i in s]
                     for n in (J.SHORT_EPOCHS, J.EPOCHS)},
        "labels10": {n: [run.submit(f"labels 10x {n} epochs seed {i}", J.student_run,
                                    "labels", i, J.TA_RATIO, n) for i in s]
                     for n in (J.TA_EPOCHS, 2 * J.TA_EPOCHS)},
    }


def _after_grid(run: _Pool, best: tuple[float, float]) -> dict[str, Any]:
    """Submit the KD students and TA chains at the chosen T and alpha."""
    s, e = J.SEEDS, J.TA_EPOCHS
    return {
        "chains": {(a, n): [run.submit(f"takd assistants {a} epochs {n} seed {i}",
                                       J.takd_run, a, n, i, *best) for i in s]
                   for a, n in ((0, e), (0, 2 * e), (1, e))},
        "kd": {("kd", n): [run.submit(f"KD {n} epochs seed {i}", J.student_run, "kd", i,
                                      J.RATIO, n, *best) for i in s]
               for n in (J.SHORT_EPOCHS, J.EPOCHS)},
    }


def section(echo: Echo, workers: int = WORKERS) -> str:
    """Run every experiment (in ``workers`` spawned processes; 0: in this one) and return
    the section's Markdown."""
    start = time.perf_counter()
    facts = _prepare(echo)
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                initializer=J.init_worker) if workers else _Inline())
    with tempfile.TemporaryDirectory() as tmp, pool:
        run = _Pool(pool, echo)
        path = str(Path(tmp) / "validation-teacher.nnc")
        val_teacher = run.submit("validation teacher", J.validation_teacher, path)
        jobs = _independent(run)
        val_acc = val_teacher.result()
        grid_jobs = {tc: run.submit(f"grid T {tc[0]:g} α {tc[1]:g}", J.grid_point, path, *tc)
                     for tc in J.GRID}
        jobs |= _labels(run)
        grid = _resolve(grid_jobs)
        best = max(J.GRID, key=lambda tc: grid[tc])     # first of equals: grid order
        jobs |= _after_grid(run, best)
        got = _resolve(jobs)
    seconds = time.perf_counter() - start
    return "\n".join([
        DISTILL_INTRO, "",
        tab.kd_table(facts, (val_acc, grid), best, got["students"] | got["kd"]), "",
        tab.takd_table(facts, best, got["labels10"], got["chains"]), "",
        tab.fskd_table(got["fskd"]), "",
        tab.tune_table(got["tune"]), "",
        tab.domain_table(facts, got["domain"]), "",
        tab.embed_table(facts, got["embed"]), "",
        f"The section ran in {seconds:.0f} s ({workers} worker processes).",
    ])
