"""Markdown of the distillation bench section (:mod:`distill`): one table function per
experiment, each taking the records of :mod:`distill_jobs` and returning the table with
its explanation and verdict line. Means and sample standard deviations over the seeds;
every difference also per seed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import distill_jobs as J
from nncompress.data.domains import SHIFT, SHIFTED_NAME
from nncompress.report import fmt_bytes, render_markdown

__all__ = ["Facts", "domain_table", "embed_table", "fskd_table", "kd_table", "takd_table",
           "tune_table"]


@dataclass(frozen=True)
class Facts:
    """What the tables quote about the models, measured once in this process."""

    teacher_params: int
    teacher_channels: tuple[int, ...]
    teacher_acc: float
    teacher_target_acc: float
    student_channels: tuple[int, ...]
    ta_channels: tuple[int, ...]
    embed_dim: int


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


def _beats(diffs: Sequence[float]) -> str:
    """Verdict on "the mean per-seed difference is positive", saying when it is not larger
    than the seed-to-seed spread of the differences."""
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    if _mean(diffs) <= 0:
        return "**not met**"
    return "**met**" if _mean(diffs) >= sd else "**met, but within the seed spread**"


def _diff(diffs: Sequence[float]) -> str:
    """``+x.x points (per seed ...)`` of per-seed differences of fractions."""
    return f"{_mean(diffs) * 100:+.1f} points (per seed {_signed(diffs)}{_spread(diffs)})"


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


def kd_table(f: Facts, validation: tuple[float, dict[tuple[float, float], float]],
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
        f"Target (KD beats labels, {J.EPOCHS} epochs): {_beats(main)} -- KD − labels "
        f"{_diff(main)}; at {J.SHORT_EPOCHS} epochs {_diff(short)}."])


# ------------------------------------------------------------ 2. TAKD


def takd_table(f: Facts, best: tuple[float, float],
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
        f"TAKD − direct KD: {_diff(same_link)} at equal epochs per link, "
        f"{_diff(same_total)} at equal total epochs. Target (TAKD beats direct KD at "
        f"equal total epochs): {_beats(same_total)}."])


# ------------------------------------------------------------ 3. FSKD


def fskd_table(runs: dict[str, list[J.FskdRun]]) -> str:
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


def tune_table(runs: dict[tuple[str, str, str], list[J.TuneRun]]) -> str:
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
        notes.append(f"{model} {recipe}: KD − CE {_diff(gains)}, bytes "
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


def domain_table(f: Facts, runs: dict[str, list[J.DomainRun]]) -> str:
    shift = ", ".join(f"`{k}={v}`" for k, v in SHIFT.items())
    params = runs["source-only"][0].params
    rows = [[f"teacher cnn1d ({f.teacher_params:,} params)", "source labels (reference)",
             f"{f.teacher_target_acc * 100:.1f} %", f"{f.teacher_acc * 100:.1f} %"]]
    rows += [[f"student cnn1d {_chans(f.student_channels)} ({params:,})", _DOMAIN_ROWS[m],
              _pm([r.target for r in rs]), _pm([r.source for r in rs])]
             for m, rs in runs.items()]
    def vs(other: str) -> list[float]:
        return [a.target - b.target for a, b in zip(runs["mobileda"], runs[other], strict=True)]

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
        f"Adaptation (MobileDA − source-only on the target): {_diff(vs('source-only'))} "
        f"{_beats(vs('source-only'))}; the alignment term alone (MobileDA − KD on target "
        f"inputs): {_diff(vs('kd-target'))}."])


# ------------------------------------------------------------ 6. label-free embedder


def embed_table(f: Facts, runs: dict[str, list[J.EmbedRun]]) -> str:
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
