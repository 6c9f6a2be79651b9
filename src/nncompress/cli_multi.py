"""The subcommands that work on several models at once: ``zip`` (multi-task zipping, He,
Zhou & Thiele 2018), ``cascade`` and ``router`` (run-time multiplexing, Eshratifar &
Pedram 2020) and ``branches`` (a shared frozen backbone with task heads).

Each checks every input it can before any training (output path, models, data, options),
runs its method from :mod:`nncompress.share.methods`, saves the result as one ``.nnc``
file (``nc.load`` gives it back: a ``ZippedPair``, ``CascadeModel``, ``MultiplexerModel``
or ``BranchesModel``) and prints the method's rows: test accuracy per task, parameters,
MACs per input and ``.nnc`` bytes of the input models and of the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nncompress.cli_commands import _table, emit
from nncompress.cli_inputs import (
    CLIError,
    check_input_file,
    check_output_file,
    is_reference,
    load_data,
    load_model,
    looks_like_file,
    quoted,
    refuse_pickled,
    user_model_class,
)
from nncompress.errors import DataError, ModelError

if TYPE_CHECKING:
    from torch import nn

    from nncompress.data import Dataset
    from nncompress.share.methods import MultiInputs, MultiResult

__all__ = ["HANDLERS"]


# --------------------------------------------------------------------------- models


def _check_model(spec: str, option: str) -> bool:
    """Check a model reference before any work; ``True`` if it names a reference model
    (trained here). A ``.nnc`` of a user model cannot be rebuilt without its class."""
    from nncompress import models

    refuse_pickled(spec, option)
    if looks_like_file(spec):
        path = check_input_file(Path(spec), f"{option} model file")
        user_class = user_model_class(path)
        if user_class is not None:
            raise ModelError(f"{option} {quoted(spec)} holds a user model of class "
                             f"{user_class[:120]}; give {option} "
                             "package.module:function, a function that returns it "
                             "(e.g. nc.load(path, skeleton=YourClass()))")
        return False
    if is_reference(spec):
        return False
    models.spec(spec)  # an unknown name fails here
    return True


def _check_models(specs: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """Every ``(spec, option)`` checked; ``--epochs`` only with a reference model name."""
    named = [_check_model(spec, option) for spec, option in specs]
    if args.epochs is not None and not any(named):
        raise CLIError("--epochs sets the training of models given as reference model "
                       "names; none is given")


def _model(spec: str, option: str, data: Dataset, args: argparse.Namespace) -> nn.Module:
    """A model from a file or function, or a reference model trained on ``data``."""
    from nncompress import models

    if looks_like_file(spec) or is_reference(spec):
        return load_model(spec, None, option)
    model, _ = models.load(spec, data, seed=args.seed, epochs=args.epochs,
                           progress=not args.no_progress)
    return model


def _inputs(models: list[nn.Module], names: list[str], tasks: tuple[Dataset, ...],
            args: argparse.Namespace, **extra: Any) -> MultiInputs:
    from nncompress.share.methods import MultiInputs

    return MultiInputs(tuple(models), tuple(names), tasks, seed=args.seed,
                       progress=not args.no_progress, **extra)


# --------------------------------------------------------------------------- data


def _subsets(data: Dataset, tasks: list[tuple[int, ...]], seed: int) -> tuple[Dataset, ...]:
    from nncompress.data import class_subset

    return tuple(class_subset(data, classes, seed=seed) for classes in tasks)


#: command -> why it needs labelled data (its one-line error on data with inputs only)
_LABELS = {"zip": "nncompress zip (re-training both tasks on their labels)",
           "cascade": "nncompress cascade (calibrating thresholds on held-out accuracy)",
           "router": "nncompress router (training the router on which model is right)",
           "branches": "nncompress branches (training one head per task)"}


def _zip_tasks(args: argparse.Namespace) -> tuple[Dataset, ...]:
    """``--data-a`` / ``--data-b``, or ``--data`` cut by two ``--tasks``."""
    pair = (args.data_a, args.data_b)
    if args.data is not None or args.tasks is not None:
        if args.data is None or args.tasks is None or any(d is not None for d in pair):
            raise CLIError("zip: give --data-a and --data-b, or --data with --tasks A B")
        if len(args.tasks) != 2:
            raise CLIError(f"zip: --tasks needs exactly two tasks (got {len(args.tasks)})")
        return _subsets(load_data(args.data, seed=args.seed, needs_labels=_LABELS["zip"]),
                        args.tasks, args.seed)
    if None in pair:
        raise CLIError("zip: give --data-a and --data-b, or --data with --tasks A B")
    tasks = tuple(load_data(ref, seed=args.seed, needs_labels=_LABELS["zip"]) for ref in pair)
    if tasks[0].input_shape != tasks[1].input_shape:
        raise DataError(f"zip: the tasks must share an input; --data-a {quoted(pair[0])} has "
                        f"samples shaped {tasks[0].input_shape}, --data-b {quoted(pair[1])} "
                        f"{tasks[1].input_shape}")
    return tasks


# --------------------------------------------------------------------------- output


def _finish(result: MultiResult, method: str, names: list[str],
            args: argparse.Namespace) -> int:
    """Save the result, then print its rows and notes (or JSON)."""
    from nncompress import api

    last = result.rows[-1]
    meta = {"method": method, "models": names, "tasks": list(result.tasks),
            "accuracy": list(last.accuracy), **result.facts}
    size = api.save(result.model, args.out, meta=meta)
    if args.json:
        rows = [{"label": r.label, "accuracy": list(r.accuracy), "params": r.params,
                 "macs": r.macs, "file_bytes": r.file_bytes} for r in result.rows]
        print(json.dumps({"method": method, "tasks": list(result.tasks), "rows": rows,
                          "notes": list(result.notes), "out": str(args.out),
                          "bytes": size}, indent=2))
        return 0
    emit(_rows_table(result))
    for note in result.notes:
        emit(note)
    emit(f"saved {size} bytes to {args.out}")
    return 0


def _rows_table(result: MultiResult) -> str:
    from nncompress.report import fmt_bytes, fmt_count, fmt_pct

    accs = ([f"test accuracy {t}" for t in result.tasks] if len(result.tasks) > 1
            else ["test accuracy"])
    headers = ["model", *accs, "parameters", "MACs / input", "bytes (.nnc)"]
    return _table(headers, [[r.label, *(fmt_pct(a) for a in r.accuracy), fmt_count(r.params),
                             fmt_count(r.macs), fmt_bytes(r.file_bytes)]
                            for r in result.rows])


# --------------------------------------------------------------------------- commands


def _cmd_zip(args: argparse.Namespace) -> int:
    from nncompress.share.methods import configure, run_zip

    check_output_file(args.out)
    config = configure("multi_task_zipping", share=tuple(args.share),
                       criterion=args.criterion, retrain_epochs=args.retrain_epochs,
                       final_epochs=args.final_epochs, lr=args.lr)
    specs = [(args.model_a, "--model-a"), (args.model_b, "--model-b")]
    _check_models(specs, args)
    tasks = _zip_tasks(args)
    members = [_model(spec, option, task, args)
               for (spec, option), task in zip(specs, tasks, strict=True)]
    names = [spec for spec, _ in specs]
    return _finish(run_zip(_inputs(members, names, tasks, args), config),
                   "multi_task_zipping", names, args)


def _budget(args: argparse.Namespace, members: list[nn.Module], data: Dataset) -> float:
    """``--budget-macs`` in MACs per input (a percentage: of the costliest model's)."""
    from nncompress.data import example_input
    from nncompress.measure import count_macs

    value, percent = args.budget_macs
    if not percent:
        return value
    x = example_input(data, 1)
    return value / 100 * max(count_macs(m, x).total for m in members)


def _multiplex(args: argparse.Namespace, method: str, **params: Any) -> int:
    """``cascade`` / ``router``: models (reference ones trained on the training split less
    the held-out part), calibrated on the held-out part, evaluated on the test split."""
    from nncompress.data import holdout
    from nncompress.share import methods

    check_output_file(args.out)
    methods.configure(method, budget_macs=1.0, **params)  # every other value, before work
    _check_models([(spec, "--models") for spec in args.models], args)
    data = load_data(args.data, seed=args.seed, needs_labels=_LABELS[args.command])
    rest, held = holdout(data, args.held_out, seed=args.seed)
    members = [_model(spec, "--models", rest, args) for spec in args.models]
    inputs = _inputs(members, list(args.models), (data,), args, calibration=held)
    methods.check_fits(inputs, args.command, same_classes=True)
    config = methods.configure(method, budget_macs=_budget(args, members, data), **params)
    run = methods.run_cascade if method == "confidence_cascade" else methods.run_router
    return _finish(run(inputs, config), method, list(args.models), args)


def _cmd_cascade(args: argparse.Namespace) -> int:
    return _multiplex(args, "confidence_cascade")


def _cmd_router(args: argparse.Namespace) -> int:
    return _multiplex(args, "learned_router", hidden=args.router_hidden,
                      epochs=args.router_epochs)


def _cmd_branches(args: argparse.Namespace) -> int:
    from nncompress.share.methods import configure, run_branches

    check_output_file(args.out)
    config = configure("shared_backbone", epochs=args.head_epochs, lr=args.lr,
                       head_hidden=args.head_hidden)
    _check_models([(args.backbone, "--backbone")], args)
    if args.tasks is not None and len(args.data) != 1:
        raise CLIError(f"branches: --tasks cuts tasks from one --data (got {len(args.data)} "
                       "datasets)")
    datasets = [load_data(ref, seed=args.seed, needs_labels=_LABELS["branches"])
                for ref in args.data]
    if args.tasks is not None:
        tasks, classes = _subsets(datasets[0], args.tasks, args.seed), tuple(args.tasks)
    else:
        tasks, classes = tuple(datasets), (None,) * len(datasets)
    backbone = _model(args.backbone, "--backbone", datasets[0], args)
    inputs = _inputs([backbone], [args.backbone], tasks, args, classes=classes)
    return _finish(run_branches(inputs, config), "shared_backbone", [args.backbone], args)


# --------------------------------------------------------------------------- eval


def eval_target(model: nn.Module, spec: str, args: argparse.Namespace,
                data: Dataset) -> tuple[nn.Module, Dataset]:
    """What ``eval`` measures: one task's output of a multi-task model (``--task``, on the
    ``--classes`` of ``--data`` it was trained on), else the model itself."""
    from nncompress.data import class_subset
    from nncompress.share.methods import task_outputs

    outputs = task_outputs(model)
    if len(outputs) == 1:
        if args.task is not None or args.classes is not None:
            raise CLIError(f"--task / --classes are for a model that answers several tasks; "
                           f"{quoted(spec)} answers one")
        return model, data
    if args.task is None or not 0 <= args.task < len(outputs):
        got = "" if args.task is None else f" (got {args.task})"
        raise CLIError(f"{quoted(spec)} answers {len(outputs)} tasks; give --task 0 to "
                       f"{len(outputs) - 1}{got}, and --classes for a task cut from --data")
    if args.classes is not None:
        data = class_subset(data, args.classes, seed=0)
    return outputs[args.task], data


def routed_macs(model: nn.Module, data: Dataset) -> float | None:
    """Average MACs per input of a cascade or multiplexer as routed on the test split
    (``None`` for any other model)."""
    from nncompress.share.composite import CascadeModel, MultiplexerModel
    from nncompress.share.multiplex import evaluate_thresholds
    from nncompress.share.router import router_curve

    if isinstance(model, CascadeModel):
        return evaluate_thresholds(list(model.models), data, model.thresholds).avg_macs
    if isinstance(model, MultiplexerModel):
        return next(p.avg_macs for p in router_curve(model, data)
                    if p.threshold == model.threshold)
    return None


HANDLERS = {"zip": _cmd_zip, "cascade": _cmd_cascade, "router": _cmd_router,
            "branches": _cmd_branches}
