"""The ``nncompress`` argument parser: subcommands, options and their value checks.

A bad value (``--seed -1``, ``--epochs 0``, an unknown option) is a one-line
:class:`~nncompress.cli_inputs.CLIError` (exit status 2) naming the option and the value,
not argparse's two-line usage message.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from nncompress.cli_inputs import CLIError, printable

__all__ = ["MAX_SEED", "build_parser"]

DATA_HELP = "dataset: mnist1d, digits or package.module:function (found in this folder too)"
MODEL_REF_HELP = ("a .nnc file, or package.module:function: a function taking no arguments "
                  "that returns an nn.Module (found in this folder too)")
CLASS_HELP = ("package.module:Class of the user model a .nnc file holds; Class() builds "
              "the skeleton its tensors load into")
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


def build_parser() -> argparse.ArgumentParser:
    """The parser; every subcommand sets ``handler`` (a name in :mod:`cli_commands`)."""
    parser = OneLineParser(
        prog="nncompress",
        description="Compress trained PyTorch models into small, fast, packed .nnc artifacts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    for name, text in (("techniques", "list every registered technique"),
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

    p = sub.add_parser("compress", help="compress a model with a recipe and save the .nnc")
    p.add_argument("--model", required=True,
                   help="reference model name (see `nncompress models`) or " + MODEL_REF_HELP)
    p.add_argument("--model-class", default=None, help=CLASS_HELP)
    p.add_argument("--data", default=None, help=DATA_HELP + " (required unless --model is a "
                   "reference model name)")
    p.add_argument("--recipe", required=True, help="recipe name or YAML file")
    p.add_argument("--out", type=Path, required=True, help="output .nnc file")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    _common(p, seed=True, handler="compress")


def _add_model_commands(sub: Any) -> None:
    """``eval`` and ``inspect``: the subcommands that look at one model."""
    p = sub.add_parser("eval", help="measure a model: accuracy, bytes, MACs, latency")
    _model_argument(p)
    p.add_argument("--model-class", default=None, help=CLASS_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
