"""The few public verbs: ``compress``, ``save``, ``load``, ``measure`` (and ``compare``).

``compress`` runs a :class:`~nncompress.recipe.Recipe` on a copy of a model and measures
the model before the first stage and after every stage, so a person sees what each
technique bought and cost: accuracy, bytes of the packed ``.nnc`` file, MACs and latency.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from nncompress import formats
from nncompress.budget import (
    BACKOFF,
    CONTROL_EPOCHS,
    backed_off,
    reference_accuracy,
    strength,
)
from nncompress.data import Dataset, holdout
from nncompress.distill.objective import frozen
from nncompress.errors import DataError, ModelError, RecipeError
from nncompress.measure import Comparison, Measurement, compare, measure
from nncompress.measure.quality import METRICS, check_metric, default_metric, quality
from nncompress.modules import decompose
from nncompress.recipe import DistillConfig, Recipe, Stage
from nncompress.technique import TECHNIQUES, Context, all_techniques
from nncompress.train import Teacher

__all__ = [
    "Comparison",
    "CompressionResult",
    "Measurement",
    "StageResult",
    "compare",
    "compress",
    "load",
    "measure",
    "save",
]


@dataclass(frozen=True)
class StageResult:
    """One recipe stage: its ``name`` (technique, ``fine_tune`` or ``evaluate``), ``kind``,
    full parameters, the :class:`Measurement` of the model after it, and the wall-clock
    ``seconds`` the stage itself took (measuring excluded)."""

    name: str
    kind: str
    params: dict[str, Any]
    measurement: Measurement
    seconds: float


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress` returns.

    ``model``: the compressed model (a copy; the caller's model is untouched), in eval
    mode. ``baseline``: the measurement of the model as given. ``stages``: one
    :class:`StageResult` per recipe stage, in order. ``log``: one-line notes from the run.
    ``model_name`` / ``dataset``: labels for tables and saved metadata.
    """

    model: nn.Module
    recipe: Recipe
    baseline: Measurement
    stages: tuple[StageResult, ...]
    log: tuple[str, ...]
    model_name: str = ""
    dataset: str = ""

    @property
    def final(self) -> Measurement:
        """The measurement after the last stage."""
        return self.stages[-1].measurement if self.stages else self.baseline

    def comparison(self) -> Comparison:
        """The final model against the baseline (ratios > 1 mean smaller / faster)."""
        return compare(self.baseline, self.final)

    def table(self) -> str:
        """A plain-text table: the baseline, then the model after every stage."""
        from nncompress.report import (
            ResultRow,
            fmt_bytes,
            fmt_count,
            fmt_ms,
            fmt_ratio,
            render_text,
        )
        from nncompress.report.tables import fmt_quality, quality_header

        points = [("baseline", self.baseline, None)]
        points += [(f"#{i} {s.name}", s.measurement, s.seconds)
                   for i, s in enumerate(self.stages, 1)]
        rows = [ResultRow.build(self.model_name, self.dataset, label, self.baseline, m)
                for label, m, _ in points]
        batch_n = next((r.batch_n for r in rows if r.batch_n), None)
        metric = self.baseline.metric
        title = quality_header(metric)
        headers = ["stage", title, f"Δ {title}", "bytes on disk", "ratio",
                   "params (non-zero)", "MACs (non-zero)", "latency b1", "speed-up b1",
                   f"latency b{batch_n or 'N'}", f"speed-up b{batch_n or 'N'}", "stage time"]
        cells = [[label, fmt_quality(r.accuracy, metric),
                  fmt_quality(r.accuracy_delta, metric, signed=True),
                  fmt_bytes(r.artifact_bytes), fmt_ratio(r.size_ratio),
                  f"{fmt_count(r.params)} ({fmt_count(r.nonzero_params)})",
                  f"{fmt_count(r.macs)} ({fmt_count(r.sparse_macs)})",
                  fmt_ms(r.latency_b1_ms), fmt_ratio(r.speedup_b1) if sec is not None else "-",
                  fmt_ms(r.latency_bn_ms), fmt_ratio(r.speedup_bn) if sec is not None else "-",
                  "-" if sec is None else f"{sec:.1f} s"]
                 for (label, _, sec), r in zip(points, rows, strict=True)]
        title = (f"{self.model_name or 'model'} on {self.dataset or 'data'}, recipe "
                 f"{self.recipe.name} (bytes: .nnc file; MACs per sample; latency: CPU "
                 "median per batch; speed-up: the uncompressed model / this one, timed "
                 "interleaved in alternating rounds)")
        return title + "\n" + render_text(headers, cells)


    def bytes_table(self, *, markdown: bool = False) -> str:
        """Han et al. (2015) Table-1 style: each weight tensor's bytes at the baseline,
        after every technique stage (best plain lossless encoding) and with Huffman coding
        after the last one, per layer and total."""
        from nncompress.report import bytes_breakdown

        return bytes_breakdown(self, markdown=markdown)


def _model_name(model: nn.Module) -> str:
    return str(getattr(type(model), "arch_name", type(model).__name__))


def _check_inputs(model: Any, data: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress needs a torch.nn.Module, got {type(model).__name__}")
    if not all(hasattr(data, a) for a in ("train", "test", "input_shape", "num_classes")):
        raise DataError(f"compress needs a Dataset (train, test, input_shape, num_classes), "
                        f"got {type(data).__name__}")


def _run_stage(model: nn.Module, stage: Stage, index: int, ctx: Context) -> nn.Module:
    """Run one stage on ``model`` (in place where the technique allows); return the model."""
    if stage.kind == "technique":
        out = TECHNIQUES.get(stage.name).apply(model, stage.config, ctx)
        if not isinstance(out, nn.Module):
            raise TypeError(f"technique {stage.name!r} returned {type(out).__name__}, "
                            "not an nn.Module")
        return out
    if stage.kind == "fine_tune":
        cfg = stage.config
        log = ctx.fine_tune(model, epochs=cfg.epochs, lr=cfg.lr,
                            desc=f"stage {index} fine-tune", lr_schedule=cfg.schedule)
        if log.final_test_acc is not None:
            from nncompress.report.tables import fmt_quality, quality_header

            ctx.note(f"stage {index} fine_tune: {log.epochs} epochs at lr {cfg.lr:g} "
                     f"({cfg.schedule}), test {quality_header(log.metric)} "
                     f"{fmt_quality(log.final_test_acc, log.metric)}")
    return model


Measure = Callable[[nn.Module], Measurement]


def _segments(stages: Sequence[Stage]) -> list[list[tuple[int, Stage]]]:
    """Stages grouped as a technique plus the fine_tune / evaluate stages after it."""
    out: list[list[tuple[int, Stage]]] = []
    for index, stage in enumerate(stages, 1):
        if stage.kind == "technique" or not out:
            out.append([])
        out[-1].append((index, stage))
    return out


def _attempt(work: nn.Module, segment: list[tuple[int, Stage]], ctx: Context,
             measure_now: Measure | None
             ) -> tuple[nn.Module, list[tuple[Stage, float, nn.Module | Measurement]]]:
    """Run ``segment``; per stage ``(stage, seconds, measurement)`` -- or, with no
    ``measure_now``, a copy of the model after it, to be measured if the attempt is kept."""
    done: list[tuple[Stage, float, nn.Module | Measurement]] = []
    for index, stage in segment:
        start = time.perf_counter()
        work = _run_stage(work, stage, index, ctx)
        seconds = time.perf_counter() - start
        done.append((stage, seconds, measure_now(work) if measure_now is not None
                     else copy.deepcopy(work)))
    return work, done


def _results(done: list[tuple[Stage, float, nn.Module | Measurement]],
             measure_now: Measure) -> list[StageResult]:
    return [StageResult(stage.name, stage.kind, stage.params,
                        m if isinstance(m, Measurement) else measure_now(m), seconds)
            for stage, seconds, m in done]


@dataclass(frozen=True)
class _Budget:
    """``max_drop`` points of the validation ``metric`` below ``base`` (a fraction):
    accuracy on labelled data; on inputs only, a label-free metric where higher is better
    (agreement, cosine, r2), scored against ``teacher`` (the uncompressed model)."""

    max_drop: float
    loader: Any
    base: float
    metric: str = "accuracy"
    teacher: nn.Module | None = None

    def drop(self, model: nn.Module) -> tuple[float, float]:
        value = quality(model, self.loader, self.metric, teacher=self.teacher)
        return value, 100.0 * (self.base - value)


def _check_budget(limit: float | None, data: Dataset, metric: str) -> None:
    """Before anything runs: on inputs only, ``max_drop`` is a budget in points of the run's
    metric, which must be one where higher is better (a one-line DataError otherwise)."""
    if limit is None or data.labelled:
        return
    if not METRICS.get(metric).higher_is_better:
        fits = ", ".join(n for n in METRICS.names() if METRICS.get(n).higher_is_better
                         and METRICS.get(n).uses_teacher())
        raise DataError(f"max_drop {limit:g} on inputs only is a budget in points of the "
                        f"quality metric, which must be one where higher is better ({fits}); "
                        f"got metric {metric!r}")


def _label_free_budget(limit: float, data: Dataset, original: nn.Module, metric: str,
                       validation: float, seed: int) -> tuple[Dataset, _Budget, str]:
    """The budget on inputs only: ``metric`` against the uncompressed model on a held-out
    part of the training inputs; its reference is the uncompressed model's own score
    (1.0 for agreement and cosine), so no control run is needed."""
    rest, held_out = holdout(data, validation, seed=seed)
    base = quality(original, held_out, metric, teacher=original)
    label = METRICS.get(metric).label
    note = (f"max_drop {limit:g} pt of {label} (the data has no labels): validation split "
            f"of {validation:g} of the training inputs (seed {seed}); reference: the "
            f"uncompressed model's {base:.4f}")
    return rest, _Budget(float(limit), held_out, base, metric, original), note


def _budgeted(work: nn.Module, segment: list[tuple[int, Stage]], ctx: Context,
              measure_now: Measure, budget: _Budget) -> tuple[nn.Module, list[StageResult]]:
    """Run ``segment``; while the validation drop exceeds the budget, rerun it from its
    starting model and masks with the technique one notch milder (:mod:`nncompress.budget`).
    Only the kept attempt's stages are measured."""
    (index, first), rest = segment[0], segment[1:]
    start_model, start_masks = copy.deepcopy(work), {k: v.clone() for k, v in ctx.masks.items()}
    config = first.config
    while True:
        stage = Stage(first.kind, first.name, config)
        work, done = _attempt(work, [(index, stage), *rest], ctx, None)
        acc, drop = budget.drop(work)
        setting = strength(first.name, config)
        ctx.note(f"max_drop: stage {index} {first.name} ({setting}): validation "
                 f"{budget.metric} {100 * acc:.2f} % ({-drop:+.2f} pt vs the reference; budget "
                 f"-{budget.max_drop:g} pt)")
        milder = backed_off(first.name, config) if drop > budget.max_drop else None
        if milder is None:
            if drop > budget.max_drop:
                ctx.note(f"max_drop: stage {index} {first.name} cannot back off further; "
                         f"budget not met ({-drop:+.2f} pt), keeping {setting}")
            return work, _results(done, measure_now)
        ctx.note(f"max_drop: backing stage {index} {first.name} off to "
                 f"{strength(first.name, milder)}")
        config = milder
        work = copy.deepcopy(start_model)
        ctx.masks.clear()
        ctx.masks.update({k: v.clone() for k, v in start_masks.items()})


def _distillation(plan: Recipe, data: Dataset, original: nn.Module,
                  teacher: nn.Module | str | None, metric: str) -> tuple[Teacher | None, str]:
    """The run's training teacher (None: cross-entropy on labels) and a note saying so."""
    from nncompress.distill.objective import loss_for

    config = plan.distill
    if isinstance(teacher, str):
        if teacher not in ("original", "none"):
            raise RecipeError(f"teacher must be 'original', 'none' or a model (got {teacher!r})")
        config = (config or DistillConfig()).model_copy(update={"teacher": teacher})
    elif isinstance(teacher, nn.Module):
        config = (config or DistillConfig()).model_copy(update={"teacher": "original"})
    elif teacher is not None:
        raise RecipeError(f"teacher must be 'original', 'none' or a model (got "
                          f"{type(teacher).__name__})")
    implied = config is None and not data.labelled
    if implied:
        config = DistillConfig()
    if config is not None and config.teacher == "none" and config.hints:
        raise RecipeError("distill hints match the features of a teacher, but the teacher "
                          "is 'none'; use teacher: original")
    if config is None or config.teacher == "none":
        return None, ("fine-tuning in the stages learns from the labels (cross-entropy; no "
                      "teacher; kd_student and fskd still learn from their own teacher)")
    source = frozen(teacher) if isinstance(teacher, nn.Module) else original  # frozen already
    name, loss = loss_for(config, metric)
    who = ("the uncompressed input model" if source is original
           else f"the given teacher {type(source).__name__}")
    detail = (f"T={config.temperature:g}, alpha={config.alpha:g}" if name == "kd"
              else "to the teacher's outputs")
    why = " (the data has no labels)" if implied else ""
    line = f"training stages distil from {who}{why}: {name} loss, {detail}"
    if not config.hints:
        return Teacher(source, loss), line
    from nncompress.distill.features import resolve
    from nncompress.distill.trainer import HintedTeacher

    for student_layer, teacher_layer in config.hints.items():
        resolve(original, student_layer)  # the student starts as a copy of the original
        resolve(source, teacher_layer)
    pairs = ", ".join(f"{s} -> {t}" for s, t in config.hints.items())
    return (HintedTeacher(source, loss, tuple(config.hints.items()), config.hint_loss,
                          config.hint_weight),
            f"{line}; feature hints ({config.hint_loss}, weight {config.hint_weight:g}): "
            f"{pairs}")


_EPOCH_FIELDS = ("epochs", "epochs_per_step", "epochs_after")


def _training_stage(plan: Recipe) -> str | None:
    """The first stage that trains (a fine_tune stage, or a technique whose config has a
    positive epoch count), as ``"stage N (name)"``; None when no stage trains."""
    for index, stage in enumerate(plan.stages, 1):
        epochs = [getattr(stage.config, f, 0) or 0 for f in _EPOCH_FIELDS]
        if any(isinstance(e, int) and e > 0 for e in epochs):
            return f"stage {index} ({stage.name})"
    return None


def _check_label_free(plan: Recipe, data: Dataset, trainer: Teacher | None) -> None:
    """Before any stage runs: on unlabelled data, a stage that trains needs a teacher whose
    loss needs no labels (one-line DataError naming the stage)."""
    if data.labelled:
        return
    stage = _training_stage(plan)
    if stage is None:
        return
    if trainer is None:
        raise DataError(f"{stage} trains, which needs labels or a teacher, but "
                        f"{data.name!r} has inputs only and teacher is 'none'")
    if getattr(trainer.loss, "alpha", None) == 0:
        raise DataError(f"{stage} trains on KD with alpha=0 (cross-entropy only), which "
                        f"needs labels; {data.name!r} has inputs only")


def compress(model: nn.Module, recipe: Recipe | str | Path, data: Dataset, *, seed: int = 0,
             progress: bool = True, measure_latency: bool = True,
             latency_batches: Sequence[int] = (1, 256),
             baseline: Measurement | None = None,
             max_drop: float | None = None, teacher: nn.Module | str | None = None,
             metric: str | None = None) -> CompressionResult:
    """Compress a copy of ``model`` with ``recipe`` (a Recipe, a packaged recipe's name or
    a YAML path), measuring it on ``data`` before the first stage and after every stage.

    The caller's ``model`` is never modified. PyTorch built-ins whose forward reads their
    submodules' weights directly (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``)
    are first rewritten to equivalents with called projections
    (:func:`nncompress.modules.decompose`; noted in the log), so every technique sees and
    changes real layers. ``seed`` seeds every random choice (the fine-tuning batch order
    among them); ``measure_latency=False`` skips the timing runs.
    ``baseline``: an earlier ``measure(model, data)`` of this same model, reused instead of
    measuring it again (so several recipes compare against one baseline). After every
    stage the model is timed interleaved with a copy of the uncompressed model (alternating
    rounds), so each speed-up compares two latencies measured together.
    ``max_drop`` (accuracy points; default: the recipe's ``max_drop``): keep the accuracy
    on a validation split carved from ``data.train`` within this many points of the
    reference (the uncompressed model's, or a control's fine-tuned on the rest of the
    training data if lower: the uncompressed model remembers the split), backing pruning
    and sharing stages off until it holds (:mod:`nncompress.budget`); the stages then
    train on the rest of the training data. On unlabelled data the budget is in points of
    ``metric`` (one where higher is better) against the uncompressed model.

    Distillation and label-free compression: ``teacher`` -- ``"original"`` (every stage
    that trains learns from the uncompressed input model, with the recipe's ``distill``
    settings or their defaults), ``"none"`` (cross-entropy on the labels), or another
    ``nn.Module`` to learn from; None: as the recipe's ``distill`` says, and on unlabelled
    data (``data.labelled`` False: inputs only) the original model. ``metric``: the quality
    metric measured and shown in every table (a name of
    :data:`nncompress.measure.METRICS`; default: the recipe's, else accuracy, or top-1
    agreement with the original model for unlabelled data; ``cosine`` for an embedding
    model). Teacher-based metrics compare with
    the uncompressed input model.
    """
    plan = Recipe.resolve(recipe)
    _check_inputs(model, data)
    all_techniques()
    quality_metric = metric or plan.metric or default_metric(data.labelled)
    check_metric(quality_metric, labelled=data.labelled, has_teacher=True)
    limit = plan.max_drop if max_drop is None else max_drop
    _check_budget(limit, data, quality_metric)
    try:
        work = copy.deepcopy(model)
    except Exception as exc:
        raise ModelError(f"cannot copy the model {type(model).__name__} "
                         f"({type(exc).__name__}: {exc})") from exc

    reference = copy.deepcopy(work).eval() if measure_latency else None
    original = frozen(work)

    def measure_now(m: nn.Module, ref: nn.Module | None) -> Measurement:
        return measure(m, data, latency_batches=tuple(latency_batches),
                       with_latency=measure_latency, reference=ref, metric=quality_metric,
                       teacher=original)

    if baseline is None:
        baseline = measure_now(work, None)
    trainer, how = _distillation(plan, data, original, teacher, quality_metric)
    _check_label_free(plan, data, trainer)
    ctx = Context(data=data, seed=seed, progress=progress, teacher=trainer,
                  metric=quality_metric, original=original)
    ctx.note(how)
    budget = None
    if limit is not None and not data.labelled:
        ctx.data, budget, line = _label_free_budget(limit, data, original, quality_metric,
                                                    plan.validation, seed)
        ctx.note(line)
    elif limit is not None:
        ctx.data, held_out = holdout(data, plan.validation, seed=seed)
        first = next((s for s in plan.stages if s.kind == "technique"), None)
        lr = float(getattr(first.config, "lr", 1e-3)) if first is not None else 1e-3
        given, control = reference_accuracy(work, ctx.data, held_out, lr=lr, seed=seed,
                                            progress=progress)
        budget = _Budget(float(limit), held_out, min(given, control))
        ctx.note(f"max_drop {limit:g} pt: validation split of {plan.validation:g} of the "
                 f"training samples (seed {seed}); validation accuracy of the uncompressed "
                 f"model {100 * given:.2f} %, of a control fine-tuned {CONTROL_EPOCHS} "
                 f"epochs on the rest without compression {100 * control:.2f} %; reference "
                 f"{100 * budget.base:.2f} %")
    work, rewrites = decompose(work, ctx.masks)
    for line in rewrites:
        ctx.note(f"rewrote {line}")
    results: list[StageResult] = []

    def measured(m: nn.Module) -> Measurement:
        return measure_now(m, reference)

    for segment in _segments(plan.stages):
        head = segment[0][1]
        if budget is not None and head.kind == "technique" and head.name in BACKOFF:
            work, kept = _budgeted(work, segment, ctx, measured, budget)
        else:
            work, done = _attempt(work, segment, ctx, measured)
            kept = _results(done, measured)
        results += kept
    work.eval()
    return CompressionResult(model=work, recipe=plan, baseline=baseline,
                             stages=tuple(results), log=tuple(ctx.log),
                             model_name=_model_name(model), dataset=str(data.name))


def save(model_or_result: nn.Module | CompressionResult, path: str | Path, *,
         meta: Mapping[str, Any] | None = None,
         encodings: Mapping[str, str] | None = None) -> int:
    """Write a packed ``.nnc`` file (no pickle) with ``formats.save``; return bytes written.

    Given a :class:`CompressionResult`, saves its model and records the recipe, dataset,
    and baseline and final test accuracy in the metadata (``meta`` entries win).
    """
    model = model_or_result
    info: dict[str, Any] = {}
    if isinstance(model_or_result, CompressionResult):
        result = model_or_result
        model = result.model
        info = {"recipe": result.recipe.name, "model": result.model_name,
                "dataset": result.dataset, "accuracy": result.final.accuracy,
                "baseline_accuracy": result.baseline.accuracy}
    if not isinstance(model, nn.Module):
        raise ModelError(f"save needs an nn.Module or a CompressionResult, "
                         f"got {type(model).__name__}")
    info.update(meta or {})
    return formats.save(model, path, meta=info or None, encodings=encodings)


def load(path: str | Path, **kwargs: Any) -> nn.Module:
    """Read a ``.nnc`` file written by :func:`save` into a runnable module (``formats.load``;
    keyword arguments such as ``skeleton=`` are passed on)."""
    return formats.load(path, **kwargs)
