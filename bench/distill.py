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

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import distill_jobs as J
from nncompress import models as zoo
from nncompress.data import load_dataset
from nncompress.data.domains import SHIFT, SHIFTED_NAME
from nncompress.models.students import student_of
from nncompress.report import fmt_bytes, render_markdown
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


@dataclass(frozen=True)
class _Facts:
    """What the tables quote about the models, measured once in this process."""

    teacher_params: int
    teacher_channels: tuple[int, ...]
    teacher_acc: float
    teacher_target_acc: float
    student_channels: tuple[int, ...]
    ta_channels: tuple[int, ...]
    embed_dim: int


def _prepare(echo: Echo) -> _Facts:
    """Train / generate whatever is not cached yet, once, before the workers read it."""
    echo("  distill: reference models and datasets (cached after the first run)")
    teacher, data = J.cnn1d()
    zoo.load("mlp", "digits", seed=0, progress=False)
    transformer, _ = zoo.load("transformer", "mnist1d", seed=0, progress=False)
    target = load_dataset(SHIFTED_NAME)
    return _Facts(J.n_params(teacher), tuple(teacher.arch_config()["channels"]),
                  evaluate(teacher, data.test),
                  evaluate(teacher, target.test),
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


# ------------------------------------------------------------ formatting


def _pm(values: Sequence[float], *, pct: bool = True, digits: int = 1) -> str:
    """``mean ± std`` (sample std over the seeds); percentages for fractions."""
    k = 100.0 if pct else 1.0
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * k:.{digits}f} ± {sd * k:.{digits}f}" + (
        " %" if pct else "")


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _signed(values: Sequence[float]) -> str:
    """Per-seed differences in points, e.g. ``+1.2, -0.3, +0.8``."""
    return ", ".join(f"{v * 100:+.1f}" for v in values)


def _spread(diffs: Sequence[float]) -> str:
    """A warning when a mean difference is smaller than its seed-to-seed spread."""
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    if abs(_mean(diffs)) >= sd:
        return ""
    return (f"; within the seed-to-seed spread (std of the per-seed differences "
            f"{sd * 100:.1f} points)")


def _chans(channels: Sequence[int]) -> str:
    return "/".join(map(str, channels))


# ------------------------------------------------------------ 1. KD vs labels


def _grid_markdown(grid: dict[tuple[float, float], float]) -> str:
    alphas = sorted({a for _, a in grid})
    return render_markdown(
        ["T \\ α", *map(str, alphas)],
        [[f"{t:g}", *(f"{grid[t, a] * 100:.1f} %" if (t, a) in grid else "-" for a in alphas)]
         for t in sorted({t for t, _ in grid})])


def _gain(runs: dict[tuple[str, int], list[J.StudentRun]], epochs: int) -> list[float]:
    """KD − labels test accuracy per seed at ``epochs``."""
    return [k.accuracy - lab.accuracy
            for k, lab in zip(runs["kd", epochs], runs["labels", epochs], strict=True)]


def _kd_table(f: _Facts, validation: tuple[float, dict[tuple[float, float], float]],
              best: tuple[float, float], runs: dict[tuple[str, int], list[J.StudentRun]]
              ) -> str:
    teacher_val, grid = validation
    params = runs["labels", J.EPOCHS][0].params
    student = f"student cnn1d {_chans(f.student_channels)}"
    rows = [[f"teacher cnn1d {_chans(f.teacher_channels)}", f"{f.teacher_params:,}",
             "labels (the reference model; seed 0 only)", str(J.SHORT_EPOCHS),
             f"{f.teacher_acc * 100:.1f} %"]]
    for (method, epochs), rs in sorted(runs.items(),
                                       key=lambda kv: (kv[0][1], kv[0][0] != "labels")):
        how = ("labels (cross-entropy)" if method == "labels"
               else f"KD from the teacher, T {best[0]:g}, α {best[1]:g}")
        size = f"{params:,} ({f.teacher_params / params:.2f}x fewer)"
        rows.append([student, size, how, str(epochs), _pm([r.accuracy for r in rs])])
    main, short = _gain(runs, J.EPOCHS), _gain(runs, J.SHORT_EPOCHS)
    return "\n".join([
        "### 1. A 4x smaller cnn1d student: KD vs labels (mnist1d)\n",
        f"Each pair of students: the same epochs, seeds, schedule and learning rate; "
        f"{J.EPOCHS} epochs (twice the teacher's) is the comparison, {J.SHORT_EPOCHS} (the "
        f"teacher's own) is shown beside it. T and α were chosen at {J.EPOCHS} epochs on a "
        f"validation split: {J.VAL_FRACTION:.0%} of the training split held out "
        f"(`nncompress.data.holdout`, seed {J.VAL_SEED}), the student distilled on the other "
        f"{1 - J.VAL_FRACTION:.0%} (seed {J.VAL_SEED}) and scored on the held-out part; the "
        "test split was not looked at. The grid's teacher is a cnn1d trained the reference "
        f"way on those {1 - J.VAL_FRACTION:.0%} only ({teacher_val * 100:.1f} % on the "
        "held-out part): the reference teacher saw the held-out samples, and its soft labels "
        "would carry their labels into the student. Validation accuracy of the grid:\n",
        _grid_markdown(grid), "",
        f"Chosen: T {best[0]:g}, α {best[1]:g} (used at both budgets). Test accuracy, "
        "trained on the full training split:\n",
        render_markdown(["model", "params", "trained from", "epochs", "test accuracy"], rows),
        "",
        f"Target (KD beats labels, {J.EPOCHS} epochs): {_verdict(_mean(main) > 0)} -- KD − "
        f"labels {_mean(main) * 100:+.1f} points (per seed {_signed(main)}{_spread(main)}); "
        f"at {J.SHORT_EPOCHS} epochs {_mean(short) * 100:+.1f} points (per seed "
        f"{_signed(short)}{_spread(short)})."])


# ------------------------------------------------------------ 2. TAKD


def _takd_table(f: _Facts, best: tuple[float, float],
                labels: dict[int, list[J.StudentRun]],
                chains: dict[tuple[int, int], list[J.ChainRun]]) -> str:
    e = J.TA_EPOCHS
    student = labels[e][0].params
    ta = chains[1, e][0].params[0]
    rows = [["labels (cross-entropy), no teacher", f"{student:,}", str(n), str(n), "-",
             _pm([r.accuracy for r in rs])] for n, rs in labels.items()]
    for (assistants, epochs), runs in chains.items():
        path = (f"teacher {f.teacher_params:,} → TA {ta:,} → student" if assistants
                else "teacher → student (direct KD)")
        rows.append([path, f"{runs[0].params[-1]:,}", str(epochs),
                     str(epochs * (assistants + 1)),
                     _pm([r.accuracy[0] for r in runs]) if assistants else "-",
                     _pm([r.accuracy[-1] for r in runs])])

    def diffs(other: int) -> list[float]:
        return [t.accuracy[-1] - d.accuracy[-1]
                for t, d in zip(chains[1, e], chains[0, other], strict=True)]

    same_link, same_total = diffs(e), diffs(2 * e)
    return "\n".join([
        f"### 2. TAKD vs direct KD, a {J.TA_RATIO:g}x smaller student\n",
        f"`nncompress.distill.trainer.takd(teacher, data, size_ratio={J.TA_RATIO:g}, "
        f"assistants=1 | 0)`: the assistant is `student_of(teacher, {J.TA_RATIO:g} ** 0.5)`, "
        f"the student `student_of(teacher, {J.TA_RATIO:g})` (cnn1d "
        f"{_chans(f.ta_channels)}, {f.teacher_params / student:.1f}x fewer parameters than "
        f"the teacher); every link trains {e} epochs by KD from the one before (T "
        f"{best[0]:g}, α {best[1]:g}: section 1's choice). The TA chain therefore spends "
        f"twice the epochs of direct KD at {e} epochs; the direct-KD row at {2 * e} "
        "epochs matches its total.\n",
        render_markdown(["chain", "student params", "epochs per link", "total epochs",
                         "TA test accuracy", "student test accuracy"], rows), "",
        f"TAKD − direct KD: {_mean(same_link) * 100:+.1f} points at equal epochs per link "
        f"(per seed {_signed(same_link)}{_spread(same_link)}), "
        f"{_mean(same_total) * 100:+.1f} points at equal total epochs (per seed "
        f"{_signed(same_total)}{_spread(same_total)}). Target (TAKD beats direct KD at "
        f"equal total epochs): {_verdict(_mean(same_total) > 0)}."])


# ------------------------------------------------------------ 3. FSKD


def _fskd_table(runs: dict[str, list[J.FskdRun]]) -> str:
    rows, verdicts = [], []
    for pruner, rs in runs.items():
        recovered = [(r.repaired - r.pruned) / (r.teacher - r.pruned) for r in rs]
        seconds = [r.seconds for r in rs]
        rows.append([f"`{pruner}`", f"{rs[0].macs_before / rs[0].macs_after:.2f}x fewer",
                     _pm([r.teacher for r in rs]), _pm([r.pruned for r in rs]),
                     _pm([r.repaired for r in rs]), _pm(recovered, digits=0),
                     _pm(seconds, pct=False, digits=2) + " s"])
        verdicts.append(f"`{pruner}`: recovered {_mean(recovered) * 100:.0f} % "
                        f"{_verdict(_mean(recovered) >= 0.5)}, fskd "
                        f"{max(seconds):.2f} s at most {_verdict(max(seconds) < 60)}")
    return "\n".join([
        "### 3. FSKD after 2x-MAC structured pruning (cnn1d, mnist1d)\n",
        "`nc.compress(cnn1d, [pruning to 2x fewer MACs without fine-tuning, fskd samples "
        f"{J.FSKD_SAMPLES}])`: L1-norm filter pruning (Li et al. 2017) or ThiNet (Luo et al. "
        "2017, its least-squares rescaling included), then few-sample KD (Li, Li, Liu & "
        f"Zhang 2020) fitted on {J.FSKD_SAMPLES} training inputs (1 % of 4000), no labels, "
        "no training. Recovered = (after FSKD − pruned) / (teacher − pruned); seconds: "
        "the fskd stage alone, one thread.\n",
        render_markdown(["pruning", "MACs", "teacher", "pruned", "after FSKD",
                         "lost accuracy recovered", "fskd stage"], rows), "",
        "Targets (≥ 50 % recovered, < 60 s): " + "; ".join(verdicts) + "."])


# ------------------------------------------------------------ 4. fine-tuning


def _tune_table(runs: dict[tuple[str, str, str], list[J.TuneRun]]) -> str:
    rows, notes = [], []
    for model, recipe in dict.fromkeys((m, r) for m, r, _ in runs):
        ce, kd = runs[model, recipe, "none"], runs[model, recipe, "original"]
        rows.append([f"{model} ({recipe})", "- (uncompressed)",
                     f"{ce[0].accuracy_before * 100:.1f} %", f"{ce[0].nonzero_before:,}",
                     fmt_bytes(ce[0].bytes_before), "1.00x"])
        for how, rs in (("the labels (cross-entropy)", ce),
                        ("the original model (KD, T 4, α 0.9)", kd)):
            rows.append([f"{model} ({recipe})", how, _pm([r.accuracy for r in rs]),
                         f"{_mean([r.nonzero for r in rs]):,.0f}",
                         fmt_bytes(_mean([r.bytes for r in rs])),
                         f"{_mean([r.bytes_before / r.bytes for r in rs]):.2f}x"])
        gains = [k.accuracy - c.accuracy for k, c in zip(kd, ce, strict=True)]
        gain = _mean(gains)
        notes.append(f"{model} {recipe}: KD − CE {gain * 100:+.1f} points (per seed "
                     f"{_signed(gains)}{_spread(gains)}), bytes "
                     f"{_mean([r.bytes for r in kd]) / _mean([r.bytes for r in ce]):.2f}x "
                     f"of CE's ({'KD better' if gain > 0 else 'KD not better'})")
    return "\n".join([
        "### 4. KD vs cross-entropy fine-tuning inside Deep Compression and int8 QAT\n",
        "The packaged recipes as written, `nc.compress(model, recipe, data, "
        "teacher=\"original\")` (every training stage -- sparse VD, centroid fine-tuning, "
        "QAT -- distils from the uncompressed model) vs `teacher=\"none\"` (the labels): "
        "the same stages, epochs and learning rates. Non-zero parameters and bytes (the "
        ".nnc file): mean of the seeds; ratio vs the uncompressed model's .nnc.\n",
        render_markdown(["model (recipe)", "training stages learn from", "test accuracy",
                         "non-zero params", ".nnc bytes", "ratio"], rows), "",
        "; ".join(notes) + "."])


# ------------------------------------------------------------ 5. cross-domain


_DOMAIN_ROWS = {
    "source-only": "source labels only (no adaptation)",
    "kd-target": "+ teacher soft labels on target inputs (KD, no alignment)",
    "mobileda": "+ MMD feature alignment (MobileDA)",
}


def _domain_table(f: _Facts, runs: dict[str, list[J.DomainRun]]) -> str:
    shift = ", ".join(f"`{k}={v}`" for k, v in SHIFT.items())
    params = runs["source-only"][0].params
    rows = [[f"teacher cnn1d ({f.teacher_params:,} params)", "source labels (reference)",
             f"{f.teacher_target_acc * 100:.1f} %", f"{f.teacher_acc * 100:.1f} %"]]
    rows += [[f"student cnn1d {_chans(f.student_channels)} ({params:,})", _DOMAIN_ROWS[m],
              _pm([r.target for r in rs]), _pm([r.source for r in rs])]
             for m, rs in runs.items()]
    gain = _mean([r.target for r in runs["mobileda"]]) - _mean(
        [r.target for r in runs["source-only"]])
    align = _mean([r.target for r in runs["mobileda"]]) - _mean(
        [r.target for r in runs["kd-target"]])
    return "\n".join([
        "### 5. Cross-domain distillation: MobileDA (mnist1d → mnist1d-shifted)\n",
        f"Source: mnist1d (labelled). Target: `{SHIFTED_NAME}`, the MNIST-1D generator "
        f"with {shift} (default shear 0.75, scale 0.4, seed 42; noise and translation "
        "unchanged), whose training labels are never read. Every student: "
        f"{J.DOMAIN_EPOCHS} epochs over the source, each source batch paired with a target "
        f"batch, Adam lr {J.LR}, constant lr, T 4, α 0.9, MMD weight 1 "
        "(`nncompress.distill.domain`: `source_only`, `target_kd`, `mobileda`).\n",
        render_markdown(["model", "trained on", "target test accuracy",
                         "source test accuracy"], rows), "",
        f"Adaptation (MobileDA − source-only on the target): {gain * 100:+.1f} points "
        f"{_verdict(gain > 0)}; the alignment term alone (MobileDA − KD on target "
        f"inputs): {align * 100:+.1f} points."])


# ------------------------------------------------------------ 6. label-free embedder


def _embed_table(f: _Facts, runs: dict[str, list[J.EmbedRun]]) -> str:
    rows, verdicts = [], []
    for recipe, rs in runs.items():
        ratio = [r.bytes_before / r.bytes for r in rs]
        cos = [r.cosine for r in rs]
        read = "none (data has no labels)" if not any(r.labelled for r in rs) else "yes"
        rows.append([f"`{recipe}`", fmt_bytes(rs[0].bytes_before),
                     fmt_bytes(_mean([r.bytes for r in rs])), _pm(ratio, pct=False, digits=2)
                     + "x", _pm(cos, pct=False, digits=4), read,
                     f"{_mean([r.seconds for r in rs]):.0f} s"])
        ok = min(ratio) >= 4 and min(cos) >= 0.99
        verdicts.append(f"`{recipe}` {_verdict(ok)} ({min(ratio):.2f}x, cosine "
                        f"{min(cos):.4f}, worst seed)")
    return "\n".join([
        "### 6. Label-free: the transformer as an embedder, compressed from inputs only\n",
        "`nc.compress(embedder_of(transformer), recipe, without_labels(mnist1d), "
        "metric=\"cosine\")`: the reference transformer without its classifier "
        f"(mean-pooled [B, {f.embed_dim}] embedding); the training stages distil from the fp32 "
        "embedder with the cosine loss; cosine: mean cosine similarity of the compressed "
        "model's embeddings to the fp32 embedder's on the test split. Bytes: the .nnc file.\n",
        render_markdown(["recipe", "bytes before", "bytes after", "ratio",
                         "cosine to fp32", "labels read", "time per run"], rows), "",
        "Target (≥ 4x, cosine ≥ 0.99): " + "; ".join(verdicts) + "."])


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
        _kd_table(facts, (val_acc, grid), best, got["students"] | got["kd"]), "",
        _takd_table(facts, best, got["labels10"], got["chains"]), "",
        _fskd_table(got["fskd"]), "",
        _tune_table(got["tune"]), "",
        _domain_table(facts, got["domain"]), "",
        _embed_table(facts, got["embed"]), "",
        f"The section ran in {seconds:.0f} s ({workers} worker processes).",
    ])
