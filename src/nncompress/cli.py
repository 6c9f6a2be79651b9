"""The ``nncompress`` command line: a thin layer over :mod:`nncompress.api`.

Bad input gives one line on stderr (``nncompress: error: ...``) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nncompress.errors import NNCError

if TYPE_CHECKING:
    from torch import nn

    from nncompress.data import Dataset
    from nncompress.kernels import SparsifyReport

EXIT_INTERNAL = 1


DATA_HELP = "dataset: mnist1d, digits or package.module:function"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nncompress`` and ``python -m nncompress``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so `--data mymodule:fn` finds the user's module
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except NNCError as exc:
        print(f"nncompress: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nncompress: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if getattr(args, "debug", False):
            raise
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"nncompress: internal error: {msg} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nncompress",
        description="Compress trained PyTorch models into small, fast, packed .nnc artifacts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: train, compress and report on bundled data")
    p.add_argument("--out", type=Path, default=Path("report"),
                   help="report folder (default: report)")
    p.add_argument("--models", default=None,
                   help="comma-separated reference models (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke run")
    _common(p, seed=True)
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("train", help="train (or load from cache) a reference model and save it")
    p.add_argument("--model", required=True, help="reference model name (see `nncompress models`)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: model's)")
    p.add_argument("--out", type=Path, required=True, help="output .nnc file")
    _common(p, seed=True)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("compress", help="compress a model with a recipe and save the .nnc")
    p.add_argument("--model", required=True, help="reference model name or a .nnc file")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--recipe", required=True, help="recipe name or YAML file")
    p.add_argument("--out", type=Path, required=True, help="output .nnc file")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    _common(p, seed=True)
    p.set_defaults(handler=_cmd_compress)

    p = sub.add_parser("eval", help="measure a .nnc model: accuracy, bytes, MACs, latency")
    p.add_argument("path", type=Path, help=".nnc file")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sparsify", action="store_true",
                   help="swap sparse Linear layers for CSR kernels where they measure faster "
                        "at batch 1 (nncompress.kernels.sparsify) and report each choice")
    _common(p)
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("inspect", help="per-tensor encodings, bytes and sparsity of a .nnc file")
    p.add_argument("path", type=Path, help=".nnc file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--entropy", action="store_true",
                   help="also compare each Huffman-coded stream with its entropy")
    _common(p)
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("techniques", help="list every registered technique")
    _common(p)
    p.set_defaults(handler=_cmd_techniques)

    p = sub.add_parser("models", help="list the reference models")
    _common(p)
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("recipes", help="list the named recipes")
    _common(p)
    p.set_defaults(handler=_cmd_recipes)
    return parser


def _common(p: argparse.ArgumentParser, *, seed: bool = False) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_demo(args: argparse.Namespace) -> int:
    from nncompress.demo import run_demo

    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    run_demo(args.out, models=names, quick=args.quick, seed=args.seed,
             progress=not args.no_progress, echo=print)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from nncompress import api, models

    _check_out(args.out)
    model, data = models.load(args.model, args.data, seed=args.seed, epochs=args.epochs,
                              progress=not args.no_progress)
    acc = api.measure(model, data, with_latency=False).accuracy
    size = api.save(model, args.out, meta={"model": args.model, "dataset": data.name,
                                           "accuracy": acc})
    print(f"{args.model} on {data.name}: test accuracy {100 * acc:.2f} %, "
          f"saved {size} bytes to {args.out}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from nncompress import api
    from nncompress.recipe import Recipe

    _check_out(args.out)
    recipe = Recipe.resolve(args.recipe)
    model, data = _model_and_data(args.model, args.data, seed=args.seed,
                                  progress=not args.no_progress)
    result = api.compress(model, recipe, data, seed=args.seed, progress=not args.no_progress,
                          measure_latency=not args.no_latency)
    print(result.table())
    size = api.save(result, args.out)
    print(f"saved {size} bytes to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nncompress import api
    from nncompress.data import load_dataset
    from nncompress.report import fmt_bytes, fmt_count, fmt_ms, fmt_pct, render_text

    model = api.load(args.path)
    data = load_dataset(args.data)
    engine = _sparsify(model, data) if args.sparsify else None
    m = api.measure(model, data, with_latency=not args.no_latency)
    m_bytes = args.path.stat().st_size
    if args.json:
        lat = [] if m.latency is None else [
            {"batch": r.batch, "median_ms": r.median_ms} for r in m.latency.results]
        out = {"accuracy": m.accuracy, "file_bytes": m_bytes, "params": m.params.total,
               "nonzero_params": m.params.nonzero, "macs": m.macs.total, "latency": lat}
        if engine is not None:
            out["sparse_engine"] = [{"layer": c.name, "sparsity": c.sparsity,
                                     "dense_us": c.dense_us[0], "sparse_us": c.sparse_us[0],
                                     "choice": c.choice} for c in engine.layers]
        print(json.dumps(out, indent=2))
        return 0
    rows = [["test accuracy", fmt_pct(m.accuracy)], ["file size", fmt_bytes(m_bytes)],
            ["parameters (non-zero)",
             f"{fmt_count(m.params.total)} ({fmt_count(m.params.nonzero)})"],
            ["MACs per sample", fmt_count(m.macs.total)]]
    if m.latency is not None:
        rows += [[f"latency batch {r.batch} (median, {m.latency.threads} threads)",
                  fmt_ms(r.median_ms)] for r in m.latency.results]
    print(render_text(["metric", "value"], rows))
    if engine is not None:
        print()
        print(render_text(
            ["layer", "sparsity", "dense b1", "CSR b1", "engine", "why"],
            [[c.name, fmt_pct(c.sparsity), f"{c.dense_us[0]:.1f} us" if c.dense_us else "-",
              f"{c.sparse_us[0]:.1f} us" if c.sparse_us else "-", c.choice, c.reason]
             for c in engine.layers]))
    return 0


def _sparsify(model: nn.Module, data: Dataset) -> SparsifyReport:
    """Deploy-time sparse engine on the loaded model; returns its per-layer report."""
    from nncompress.data import example_input
    from nncompress.kernels import sparsify

    return sparsify(model, example_input(data, 1), batch_sizes=(1,))[1]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nncompress import formats
    from nncompress.report import fmt_bytes, fmt_pct, render_text

    info = formats.inspect(args.path)
    if args.json:
        print(json.dumps(formats.read_header(args.path), indent=2))
        return 0
    rows = [[t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.encoding,
             fmt_bytes(t.stored_bytes), fmt_bytes(t.raw_bytes), fmt_pct(t.sparsity)]
            for t in info.tensors]
    print(render_text(["tensor", "shape", "dtype", "encoding", "stored", "raw", "sparsity"], rows))
    stored = sum(t.stored_bytes for t in info.tensors)
    raw = sum(t.raw_bytes for t in info.tensors)
    print(f"\nformat version {info.format_version}; file {fmt_bytes(info.total_bytes)}; "
          f"tensors {fmt_bytes(stored)} stored vs {fmt_bytes(raw)} raw")
    if args.entropy:
        print("\n" + _entropy_table(args.path))
    return 0


def _entropy_table(path: Path) -> str:
    """Huffman-coded streams of the file vs their empirical entropy (bits per symbol)."""
    from nncompress import formats
    from nncompress.formats.huffman import entropy_report
    from nncompress.report import fmt_bytes, render_text

    rows = []
    for name, (encoding, tensor) in formats.read_tensors(path).items():
        for stream in formats.ENCODINGS.get(encoding).coded_streams:
            s = entropy_report(tensor).stream(stream)
            rows.append([name, stream, str(s.symbols), f"{s.entropy_bits:.3f}",
                         f"{s.huffman_bits:.3f}", f"{100 * s.excess:+.2f} %",
                         fmt_bytes(s.table_bytes)])
    if not rows:
        return "no Huffman-coded tensors in this file"
    return ("Huffman streams (bits per symbol; excess = Huffman / entropy - 1; table = "
            "stored code lengths)\n" + render_text(
                ["tensor", "stream", "symbols", "entropy", "Huffman", "excess", "table"],
                rows))


def _cmd_techniques(args: argparse.Namespace) -> int:
    from nncompress.report import render_text
    from nncompress.technique import all_techniques

    reg = all_techniques()
    rows = [[t.name, t.category, t.paper] for t in (reg.get(n) for n in reg.names())]
    print(render_text(["technique", "survey category", "paper"], rows))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from nncompress import models
    from nncompress.report import render_text

    rows = [[s.name, s.default_dataset, s.description]
            for s in (models.spec(n) for n in models.model_names())]
    print(render_text(["model", "default data", "description"], rows))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from nncompress.recipe import Recipe

    for name in Recipe.names():
        print(name)
    return 0


def _model_and_data(model: str, data: str | None, *, seed: int, progress: bool):
    from nncompress import api, models
    from nncompress.data import load_dataset

    if model.endswith(".nnc") or Path(model).is_file():
        if data is None:
            raise NNCError(f"--data is required with a model file ({model})")
        return api.load(Path(model)), load_dataset(data, seed=seed)
    return models.load(model, data, seed=seed, progress=progress)


def _check_out(path: Path) -> None:
    if not path.parent.exists():
        raise NNCError(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise NNCError(f"output path {str(path)!r} is a folder, not a file")
