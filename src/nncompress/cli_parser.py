"""The ``nncompress`` argument parser: subcommands, options and their value checks.

A bad value (``--seed -1``, ``--epochs 0``, an unknown option) is a one-line
:class:`~nncompress.cli_inputs.CLIError` (exit status 2) naming the option and the value,
not argparse's two-line usage message.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from nncompress.cli_help import (
    CLASS_HELP,
    COMPRESS_TEXT,
    DATA_HELP,
    EVAL_TEACHER_HELP,
    METRIC_DEFAULT,
    METRIC_HELP,
    MODEL_REF_HELP,
    MULTI_MODEL_HELP,
    TEACHER_HELP,
)
from nncompress.cli_inputs import CLIError, printable

__all__ = ["MAX_SEED", "build_parser", "metric_name", "teacher_choice"]

#: seeds go to torch, numpy and Python's RNGs; numpy's take 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line CLIErrors (``nncompress: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{printable(message)} (see '{self.prog} --help')")


def _int_in(option: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``, else a CLIError naming it."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise CLIError(f"{option} must be an integer (got {printable(repr(text))[:60]})") \
                from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise CLIError(f"{option} must be {bound} (got {value})")
        return value

    parse.__name__ = option
    return parse


def model_names(text: str) -> list[str]:
    """``--models a,b``: a non-empty list of distinct names."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise CLIError(f"--models {printable(repr(text))}: expected comma-separated model "
                       "names such as mlp,cnn1d (an empty name)")
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise CLIError(f"--models names {printable(repr(sorted(seen)[0]))} twice")
    return names


def _float_in(option: str, low: float, high: float | None = None, *,
              open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in the range, else a CLIError naming it."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise CLIError(f"{option} must be a number (got {printable(repr(text))[:60]})") \
                from None
        below = value <= low if open_low else value < low
        above = high is not None and (value >= high if open_high else value > high)
        if not math.isfinite(value) or below or above:
            lo, hi = ("(" if open_low else "[") + f"{low:g}", \
                ("inf)" if high is None else f"{high:g}" + (")" if open_high else "]"))
            raise CLIError(f"{option} must be in {lo}, {hi} (got {printable(text)[:60]})")
        return value

    parse.__name__ = option
    return parse


def metric_name(text: str) -> str:
    """``--metric``: a name of :data:`nncompress.measure.METRICS`."""
    from nncompress.measure.quality import METRICS

    if text not in METRICS:
        raise CLIError(f"--metric must be one of {', '.join(METRICS.names())} "
                       f"(got {printable(repr(text))[:60]})")
    return text


def teacher_choice(text: str) -> str:
    """``compress --teacher``: ``original`` or ``none``."""
    if text not in ("original", "none"):
        raise CLIError(f"--teacher must be original (distil from the uncompressed model) or "
                       f"none (cross-entropy on the labels) (got {printable(repr(text))[:60]})")
    return text


def share_fractions(text: str) -> tuple[float, ...]:
    """``--share 1.0,0.5``: one fraction in [0, 1] per zipped layer."""
    check = _float_in("--share", 0.0, 1.0)
    return tuple(check(part.strip()) for part in text.split(","))


def class_list(text: str) -> tuple[int, ...]:
    """``--tasks`` items: classes as ``0-4``, ``5,7,9`` or ``0-2,8`` (at least two)."""
    classes: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())) or \
                (dash and int(high) < int(low)) or len(part) > 24:
            raise CLIError(f"--tasks {printable(repr(text))[:60]}: expected classes such as "
                           "0-4 or 5,7,9")
        classes += range(int(low), int(high if dash else low) + 1)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise CLIError(f"--tasks {printable(repr(text))[:60]}: a task needs two or more "
                       "distinct classes")
    return tuple(classes)


def model_list(text: str) -> list[str]:
    """``--models small.nnc,big.nnc``: two or more distinct models, cheapest first."""
    names = [n.strip() for n in text.split(",")]
    if len(names) < 2 or not all(names):
        raise CLIError(f"--models {printable(repr(text))[:80]}: expected two or more "
                       "comma-separated models, cheapest first, such as small.nnc,big.nnc")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CLIError(f"--models names {printable(repr(twice[0]))} twice")
    return names


def budget_macs(text: str) -> tuple[float, bool]:
    """``--budget-macs``: MACs per input (``120000``, ``1.2e5``) or a percentage of the
    most expensive model's (``50%``); returns ``(value, is_percent)``."""
    percent = text.strip().endswith("%")
    number = text.strip().removesuffix("%")
    value = _float_in("--budget-macs", 0.0, None, open_low=True)(number)
    return value, percent


def build_parser() -> argparse.ArgumentParser:
    """The parser; every subcommand sets ``handler`` (a name in :mod:`cli_commands`)."""
    parser = OneLineParser(
        prog="nncompress",
        description="Compress trained PyTorch models into small, fast, packed .nnc artifacts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_export_command(sub)
    _add_run_command(sub)
    _add_multi_commands(sub)
    for name, text in (("techniques", "list every registered technique and multi-model "
                                      "method"),
                       ("models", "list the reference models"),
                       ("recipes", "list the named recipes")):
        _common(sub.add_parser(name, help=text), handler=name)
    return parser


def _add_training_commands(sub: Any) -> None:
    """``demo``, ``train`` and ``compress``: the subcommands that train."""
    p = sub.add_parser("demo", help="the main job: train, compress and report on bundled data")
    p.add_argument("--out", type=Path, default=Path("report"),
                   help="report folder, replaced as a whole at the end (default: report)")
    p.add_argument("--models", type=model_names, default=None,
                   help="comma-separated reference models (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke run")
    _common(p, seed=True, handler="demo")

    p = sub.add_parser("train", help="train (or load from cache) a reference model and save it")
    p.add_argument("--model", required=True, help="reference model name (see `nncompress models`)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--epochs", type=_int_in("--epochs", 1), default=None,
                   help="training epochs, >= 1 (default: the model's)")
    p.add_argument("--out", type=Path, required=True, help="output .nnc file")
    _common(p, seed=True, handler="train")

    p = sub.add_parser("compress", help="compress a model with a recipe and save the .nnc",
                       description=COMPRESS_TEXT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="reference model name (see `nncompress models`) or " + MODEL_REF_HELP)
    p.add_argument("--model-class", default=None, help=CLASS_HELP)
    p.add_argument("--data", default=None, help=DATA_HELP + " (required unless --model is a "
                   "reference model name)")
    p.add_argument("--recipe", required=True, help="recipe name or YAML file")
    p.add_argument("--out", type=Path, required=True, help="output .nnc file")
    p.add_argument("--max-drop", type=_float_in("--max-drop", 0.0, 100.0), default=None,
                   metavar="POINTS",
                   help="accuracy budget in points on a validation split carved from the "
                        "training data (on inputs only: points of the metric, e.g. agreement "
                        "with the uncompressed model); lossy stages back off until it holds "
                        "(default: the recipe's max_drop)")
    p.add_argument("--teacher", type=teacher_choice, default=None, metavar="original|none",
                   help=TEACHER_HELP)
    p.add_argument("--metric", type=metric_name, default=None, metavar="NAME",
                   help=METRIC_HELP + "; teacher metrics compare with the uncompressed "
                        "model (default: the recipe's, else " + METRIC_DEFAULT + ")")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    _common(p, seed=True, handler="compress")


def _add_model_commands(sub: Any) -> None:
    """``eval`` and ``inspect``: the subcommands that look at one model."""
    p = sub.add_parser("eval", help="measure a model: accuracy, bytes, MACs, latency")
    _model_argument(p)
    p.add_argument("--model-class", default=None, help=CLASS_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--metric", type=metric_name, default=None, metavar="NAME",
                   help=METRIC_HELP + " (default: " + METRIC_DEFAULT + ")")
    p.add_argument("--teacher", default=None, metavar="MODEL", help=EVAL_TEACHER_HELP)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--task", type=_int_in("--task", 0), default=None, metavar="I",
                   help="for a model answering several tasks (nncompress zip / branches): "
                        "which output to measure, from 0")
    p.add_argument("--classes", type=class_list, default=None, metavar="CLASSES",
                   help="with --task: the classes of --data that task holds, e.g. 5-9 "
                        "(as given to --tasks)")
    p.add_argument("--sparsify", action="store_true",
                   help="swap sparse Linear layers for CSR kernels where they measure faster "
                        "at batch 1 (nncompress.kernels.sparsify) and report each choice")
    _common(p, handler="eval")

    p = sub.add_parser("inspect", help="per-tensor encodings, bytes and sparsity of a model "
                                       "file (or of the file nc.save would write)")
    _model_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--entropy", action="store_true",
                   help="also compare each Huffman-coded stream with its entropy")
    _common(p, handler="inspect")


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 1,40``: one sample's shape, positive integers, no batch dimension."""
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 8 or not all(p.isdigit() and 0 < int(p) <= 2**20 for p in parts):
        raise CLIError(f"--input-shape {printable(repr(text))[:60]}: expected one sample's "
                       "shape as positive integers such as 1,40 (no batch dimension)")
    return tuple(int(p) for p in parts)


def _add_export_command(sub: Any) -> None:
    """``export``: a model file to a deployment format."""
    p = sub.add_parser("export", help="export a model to ONNX (an int8 model as integer ONNX "
                                      "that ONNX Runtime runs bit-exactly like nncompress, "
                                      "any other model as float ONNX) or, an int8 model, to "
                                      "dependency-free C99 (--format c: model.c + model.h)")
    _model_argument(p)
    p.add_argument("--model-class", default=None, help=CLASS_HELP)
    p.add_argument("--format", default="onnx", metavar="FORMAT",
                   help="output format: onnx (default) or c (a directory with model.c and "
                        "model.h for microcontrollers; int8 models)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (onnx) or directory (c), each file written whole or not "
                        "at all (default: MODEL with the format's suffix, e.g. model.onnx "
                        "beside model.nnc, or the folder model_c)")
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="D,D,...",
                   help="one sample's input shape, without the batch dimension (default: "
                        "test samples of the dataset the file names, else its recorded "
                        "input shape)")
    p.add_argument("--data", default=None,
                   help="--format c of a float model: quantize it to int8 first, calibrated on "
                        "256 training samples of this dataset (" + DATA_HELP + ")")
    _common(p, handler="export")


def _add_run_command(sub: Any) -> None:
    """``run``: an exported model (ONNX, C export directory, .nnc) on inputs from a file."""
    p = sub.add_parser("run", help="run a deployed model (a .onnx file, a C export directory "
                                   "or a .nnc file) on a batch from a .npy file")
    p.add_argument("model", metavar="MODEL", help="model.onnx, a C export directory or "
                                                  "model.nnc")
    p.add_argument("--input", type=Path, required=True, metavar="F.npy",
                   help="the batch, batch first (.npy; .npz with one array per input, in "
                        "order); never unpickled")
    p.add_argument("--out", type=Path, default=None, metavar="F.npy",
                   help="write the outputs here (.npy; .npz when the model has several)")
    p.add_argument("--threads", type=_int_in("--threads", 1, 256), default=1,
                   help="ONNX Runtime intra-op threads (default: 1)")
    _common(p, handler="run")


def _add_multi_commands(sub: Any) -> None:
    """``zip``, ``cascade``, ``router`` and ``branches``: methods over several models."""
    _add_zip(sub)
    _add_multiplexers(sub)
    _add_branches(sub)


def _add_zip(sub: Any) -> None:
    p = sub.add_parser("zip", help="multi-task zipping (He, Zhou & Thiele 2018): merge two "
                                   "models on one input into one .nnc")
    p.add_argument("--model-a", required=True, metavar="MODEL",
                   help="task A's model: " + MULTI_MODEL_HELP)
    p.add_argument("--model-b", required=True, metavar="MODEL",
                   help="task B's model: " + MULTI_MODEL_HELP)
    p.add_argument("--data-a", default=None, metavar="DATA", help="task A's data: " + DATA_HELP)
    p.add_argument("--data-b", default=None, metavar="DATA", help="task B's data: " + DATA_HELP)
    p.add_argument("--data", default=None, metavar="DATA",
                   help="instead of --data-a / --data-b: one dataset cut into two tasks by "
                        "--tasks; " + DATA_HELP)
    _tasks_option(p, "two, with --data")
    p.add_argument("--share", type=share_fractions, default=(1.0,), metavar="F[,F...]",
                   help="fraction of units merged per hidden layer from the input side, "
                        "e.g. 1.0,0.5 (one number: every layer; default 1)")
    p.add_argument("--criterion", choices=("hessian", "euclidean"), default="hessian",
                   help="merge cost: MTZ's Hessian-based one, or Euclidean (an ablation)")
    p.add_argument("--retrain-epochs", type=_int_in("--retrain-epochs", 0), default=2, metavar="N",
                   help="epochs re-training both tasks after each merged layer (default 2)")
    p.add_argument("--final-epochs", type=_int_in("--final-epochs", 0), default=5, metavar="N",
                   help="epochs re-training both tasks at the end (default 5)")
    p.add_argument("--lr", type=_float_in("--lr", 0.0, open_low=True), default=1e-3,
                   metavar="LR", help="re-training learning rate (default 0.001)")
    _multi_common(p, "zip", "zipped model (.nnc; its forward returns both tasks' logits)")


def _add_multiplexers(sub: Any) -> None:
    for name, text in (("cascade", "confidence cascade (Eshratifar & Pedram 2020): "
                                   "smallest model first, larger ones while it is unsure"),
                       ("router", "learned router (Eshratifar & Pedram 2020): a small "
                                  "network picks one model per input")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--models", type=model_list, required=True, metavar="MODEL,MODEL[,...]",
                       help="comma-separated models of one task, cheapest first; each "
                            + MULTI_MODEL_HELP)
        p.add_argument("--data", required=True, metavar="DATA", help=DATA_HELP)
        p.add_argument("--budget-macs", type=budget_macs, required=True, metavar="MACS|P%",
                       help="average MACs per input allowed, e.g. 120000, or a percentage "
                            "of the most expensive model's, e.g. 50%%")
        p.add_argument("--held-out", type=_float_in("--held-out", 0.0, 1.0, open_low=True,
                                                     open_high=True), default=0.2,
                       metavar="F",
                       help="fraction of the training split held out (seeded by --seed) to "
                            "calibrate on; reference models train on the rest; models given "
                            "as files must not have trained on it (default 0.2)")
        if name == "router":
            p.add_argument("--router-hidden", type=_int_in("--router-hidden", 1), default=32,
                           metavar="N", help="hidden units of the router MLP (default 32)")
            p.add_argument("--router-epochs", type=_int_in("--router-epochs", 1), default=60,
                           metavar="N", help="router training epochs (default 60)")
        _multi_common(p, name, f"{name} (.nnc holding every model)")


def _add_branches(sub: Any) -> None:
    p = sub.add_parser("branches", help="shared frozen backbone with one trained head per "
                                        "task")
    p.add_argument("--backbone", required=True, metavar="MODEL",
                   help="a classifier whose Linear output layer is replaced by task heads: "
                        + MULTI_MODEL_HELP)
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="one dataset per task (same input), or one with --tasks; " + DATA_HELP)
    _tasks_option(p, "one head per task, with one --data (a reference model backbone trains "
                     "on the first --data, all classes)")
    p.add_argument("--head-epochs", type=_int_in("--head-epochs", 1), default=10, metavar="N",
                   help="epochs training each head (default 10)")
    p.add_argument("--head-hidden", type=_int_in("--head-hidden", 0), default=0, metavar="N",
                   help="hidden units of each head (default 0: one Linear layer)")
    p.add_argument("--lr", type=_float_in("--lr", 0.0, open_low=True), default=1e-2,
                   metavar="LR", help="head learning rate (default 0.01)")
    _multi_common(p, "branches", "backbone and heads (.nnc; forward returns every task's "
                                 "logits)")


def _tasks_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--tasks", type=class_list, nargs="+", default=None, metavar="CLASSES",
                   help="tasks as class subsets of --data, e.g. 0-4 5-9 (relabelled 0..k-1); "
                        + text)


def _multi_common(p: argparse.ArgumentParser, handler: str, out: str) -> None:
    p.add_argument("--epochs", type=_int_in("--epochs", 1), default=None, metavar="N",
                   help="training epochs of models given as reference model names "
                        "(default: the model's)")
    p.add_argument("--out", type=Path, required=True, help="output file: " + out)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(p, seed=True, handler=handler)


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=None, metavar="MODEL", help=MODEL_REF_HELP)
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same as MODEL")


def _common(p: argparse.ArgumentParser, *, handler: str, seed: bool = False) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    if seed:
        p.add_argument("--seed", type=_int_in("--seed", 0, MAX_SEED), default=0,
                       help=f"random seed, 0 to {MAX_SEED} (default: 0)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=handler)


def model_spec(args: argparse.Namespace) -> str:
    """The MODEL of ``eval`` / ``inspect``: the positional argument or ``--model``."""
    if (args.path is None) == (args.model_option is None):
        raise CLIError(f"{args.command}: give the model once, as MODEL or --model MODEL")
    return str(args.path if args.path is not None else args.model_option)
