"""The subcommands of ``nncompress``: each takes the parsed arguments, prints its result and
returns the exit code. Every name that came from a file or from user code is escaped
(:func:`~nncompress.cli_inputs.printable`) before it is printed."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nncompress.cli_inputs import (
    CLIError,
    check_output_file,
    is_reference,
    load_data,
    load_model,
    looks_like_file,
    printable,
    quoted,
    refuse_pickled,
)
from nncompress.cli_parser import model_spec

if TYPE_CHECKING:
    from torch import nn

    from nncompress.data import Dataset

__all__ = ["HANDLERS", "emit"]


def emit(text: str = "") -> None:
    """Print ``text`` with anything non-printable escaped (line breaks kept)."""
    print(printable(text, newlines=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from nncompress.report import render_text

    return render_text(headers, [[printable(c) for c in row] for row in rows])


# --------------------------------------------------------------------------- demo / train


def _cmd_demo(args: argparse.Namespace) -> int:
    from nncompress.demo import run_demo
    from nncompress.report.writer import check_report_target

    check_report_target(args.out)
    run_demo(args.out, models=args.models, quick=args.quick, seed=args.seed,
             progress=not args.no_progress, echo=emit)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from nncompress import api, models

    check_output_file(args.out)
    refuse_pickled(args.model)
    models.spec(args.model)  # an unknown name fails before any data is loaded
    data = None if args.data is None else load_data(
        args.data, seed=args.seed, needs_labels=f"nncompress train (training {args.model} "
                                                "from scratch)")
    model, data = models.load(args.model, data, seed=args.seed, epochs=args.epochs,
                              progress=not args.no_progress)
    acc = api.measure(model, data, with_latency=False).accuracy
    size = api.save(model, args.out, meta={"model": args.model, "dataset": data.name,
                                           "accuracy": acc})
    emit(f"{args.model} on {data.name}: test accuracy {100 * acc:.2f} %, "
         f"saved {size} bytes to {args.out}")
    return 0


# --------------------------------------------------------------------------- compress


def _model_and_data(args: argparse.Namespace) -> tuple[nn.Module, Dataset]:
    """``--model`` as a reference model's name (trained or cached), a ``.nnc`` file or
    ``module:function``, with ``--data`` (required for the last two)."""
    from nncompress import models

    spec: str = args.model
    refuse_pickled(spec)
    if looks_like_file(spec) or is_reference(spec):
        if args.data is None:
            raise CLIError(f"--data is required with --model {quoted(spec)} (only a "
                           "reference model has a default dataset)")
        model = load_model(spec, args.model_class)
        return model, load_data(args.data, seed=args.seed)
    if args.model_class is not None:
        raise CLIError("--model-class is for a .nnc file holding a user model, not for "
                       f"the reference model {quoted(spec)}")
    models.spec(spec)  # an unknown name fails before any data is loaded
    data = None if args.data is None else load_data(
        args.data, seed=args.seed, needs_labels=f"--model {spec} (a reference model, trained "
        "here on --data; give a trained model as a .nnc file or package.module:function "
        "instead)")
    return models.load(spec, data, seed=args.seed, progress=not args.no_progress)


def _cmd_compress(args: argparse.Namespace) -> int:
    from nncompress import api
    from nncompress.recipe import Recipe

    check_output_file(args.out)
    recipe = Recipe.resolve(args.recipe)
    model, data = _model_and_data(args)
    result = api.compress(model, recipe, data, seed=args.seed, progress=not args.no_progress,
                          measure_latency=not args.no_latency, max_drop=args.max_drop,
                          teacher=args.teacher, metric=args.metric)
    emit(result.table())
    if result.log:   # what the training stages learnt from, what each stage did
        emit("\n".join(["", "notes:", *(f"  {line}" for line in result.log)]))
    size = api.save(result, args.out)
    emit(f"saved {size} bytes to {args.out}")
    return 0


# --------------------------------------------------------------------------- inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nncompress import api
    from nncompress.cli_inputs import check_input_file

    spec = model_spec(args)
    refuse_pickled(spec, "MODEL")
    if looks_like_file(spec):
        _inspect_file(check_input_file(Path(spec), "model file"), args, saved=False)
        return 0
    model = load_model(spec, None)
    with tempfile.TemporaryDirectory(prefix="nncompress-inspect-") as tmp:
        path = Path(tmp) / "model.nnc"
        api.save(model, path)
        _inspect_file(path, args, saved=True)
    return 0


def _inspect_file(path: Path, args: argparse.Namespace, *, saved: bool) -> None:
    from nncompress import formats
    from nncompress.report import fmt_bytes, fmt_pct

    info = formats.inspect(path)
    if args.json:
        print(json.dumps(formats.read_header(path), indent=2))
        return
    model, layers = _precision_rows(path)
    names = dict(enumerate(getattr(model, "_names", [])))
    rows = [[_tensor_label(t.name, names), "x".join(map(str, t.shape)) or "scalar", t.dtype,
             t.encoding, fmt_bytes(t.stored_bytes), fmt_bytes(t.raw_bytes), fmt_pct(t.sparsity)]
            for t in info.tensors]
    emit(_table(["tensor", "shape", "dtype", "encoding", "stored", "raw", "sparsity"], rows))
    if layers:
        emit("\nprecision per layer\n" + _table(["layer", "kind", "precision"], layers))
    stored = sum(t.stored_bytes for t in info.tensors)
    raw = sum(t.raw_bytes for t in info.tensors)
    source = "as nc.save writes it: " if saved else ""
    emit(f"\n{source}format version {info.format_version}; file {fmt_bytes(info.total_bytes)}"
         f"; tensors {fmt_bytes(stored)} stored vs {fmt_bytes(raw)} raw")
    if args.entropy:
        emit("\n" + _entropy_table(path))


def _precision_rows(path: Path) -> tuple[Any, list[list[str]]]:
    """The loaded model and its layers' precision rows (none for a file that needs the
    user's skeleton to load)."""
    from nncompress import formats
    from nncompress.errors import NNCError
    from nncompress.quant.precision import layer_precisions
    try:
        model = formats.load(path)
    except NNCError:
        return None, []
    return model, [[r.layer, r.kind, r.precision] for r in layer_precisions(model)]


def _tensor_label(name: str, names: dict[int, str]) -> str:
    """An int8 model's constant ``c<i>`` with the program name it stands for."""
    if name.startswith("c") and name[1:].isdigit() and int(name[1:]) in names:
        return f"{name} ({names[int(name[1:])]})"
    return name


def _entropy_table(path: Path) -> str:
    """Huffman-coded streams of the file vs their empirical entropy (bits per symbol)."""
    from nncompress import formats
    from nncompress.formats.huffman import entropy_report
    from nncompress.report import fmt_bytes

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
            "stored code lengths)\n" + _table(
                ["tensor", "stream", "symbols", "entropy", "Huffman", "excess", "table"],
                rows))


# --------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    """``nncompress export MODEL --format onnx|c [--out F]``: every check (format, output
    path, the model file) passes before anything is written; each file appears whole."""
    from nncompress import export
    from nncompress.export.examples import example_for_file
    from nncompress.report import fmt_bytes

    spec = model_spec(args)
    refuse_pickled(spec, "MODEL")
    if args.format not in export.formats():
        raise CLIError(f"--format {printable(repr(args.format))[:40]}: unknown; known: "
                       f"{', '.join(export.formats())}")
    is_file = looks_like_file(spec)
    if args.out is None and not is_file:
        raise CLIError(f"--out is required when MODEL {quoted(spec)} is not a file")
    folder = args.format == "c"
    default = (Path(spec).with_name(Path(spec).stem + "_c") if folder
               else Path(spec).with_suffix(f".{args.format}"))
    out = (_check_output_folder(args.out or default) if folder
           else check_output_file(args.out or default))
    if is_file and Path(spec).exists() and out.resolve() == Path(spec).resolve():
        raise CLIError(f"--out {quoted(out)} is the model file itself")
    model = load_model(spec, args.model_class, "MODEL")
    calibration = _calibration(args, model)
    if calibration is not None:
        example, source = calibration, f"{len(calibration)} training samples of {args.data}"
    else:
        example, source = example_for_file(Path(spec) if is_file else None, model,
                                           input_shape=args.input_shape)
    result = export.export_bytes(model, example, args.format)
    export.write_result(result, out)
    size = sum(len(d) for _, d in result.files) if result.files else len(result.data)
    what = ", ".join(n for n, _ in result.files) if result.files else ""
    emit(f"exported {spec} to {out}{f' ({what})' if what else ''} ({fmt_bytes(size)}, "
         f"{result.exporter})")
    if result.flash_bytes is not None:
        emit(f"flash: {result.flash_bytes} B ({fmt_bytes(result.flash_bytes)}: code + const "
             f"data), RAM: {result.ram_bytes} B ({fmt_bytes(result.ram_bytes or 0)}: arena + "
             "state; stack not counted)")
    emit(f"check: {result.check} ({source})")
    for note in result.notes:
        emit(f"note: {note}")
    return 0


#: training samples a float model's int8 conversion is calibrated on (export --format c)
CALIBRATION_SAMPLES = 256


def _calibration(args: argparse.Namespace, model: Any) -> Any:
    """For ``--format c`` of a float model: ``CALIBRATION_SAMPLES`` training samples of
    ``--data`` (the model is quantized to int8 on them); else None."""
    import torch

    from nncompress.data.core import first_samples
    from nncompress.export import program_of

    if args.format != "c" or program_of(model) is not None:
        return None
    if args.data is None:
        raise CLIError("--format c of a float model needs --data: it is quantized to int8 "
                       f"first, calibrated on {CALIBRATION_SAMPLES} training samples of that "
                       "dataset (or quantize it with the int8 recipe first)")
    parts = first_samples(load_data(args.data, seed=0).train, CALIBRATION_SAMPLES)
    if not parts:
        raise CLIError(f"--data {quoted(args.data)}: no training samples to calibrate on")
    if not all(isinstance(x, torch.Tensor) for x in parts):
        raise CLIError(f"--data {quoted(args.data)}: the C export takes one input tensor")
    return torch.cat(parts)


def _check_output_folder(path: Path) -> Path:
    """``path`` is a folder we may create or write into."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {quoted(path)} exists and is not a folder (the C export "
                       "writes a folder)")
    parent = path if path.exists() else path.parent
    if not parent.is_dir():
        raise CLIError(f"--out: output folder {quoted(path.parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out: cannot write to the folder {quoted(parent)} "
                       "(permission denied)")
    return path


def _cmd_run(args: argparse.Namespace) -> int:
    """``nncompress run MODEL --input F.npy [--out F.npy]``: the deployed model on a batch;
    prints the output shape and the first rows' top class."""
    import numpy as np

    from nncompress import export, runtime

    refuse_pickled(args.model, "MODEL")
    xs = _read_arrays(args.input)
    out = None if args.out is None else check_output_file(args.out)
    deployed = runtime.load(args.model, threads=args.threads)
    ys = deployed.predict(tuple(xs) if len(xs) > 1 else xs[0])
    ys = ys if isinstance(ys, tuple) else (ys,)
    if out is not None:
        import io

        buf = io.BytesIO()
        if len(ys) == 1:
            np.save(buf, ys[0], allow_pickle=False)
        else:
            np.savez(buf, *ys)
        export.write_atomic(buf.getvalue(), out)
    for k, y in enumerate(ys):
        label = f"output {k}" if len(ys) > 1 else "output"
        line = f"{label}: {list(y.shape)} float32 ({deployed.form})"
        if y.ndim == 2 and y.shape[0]:
            line += f"; top class of the first rows: {y[:8].argmax(axis=1).tolist()}"
        emit(line)
    if out is not None:
        emit(f"wrote {out}")
    return 0


def _read_arrays(path: Path) -> list[Any]:
    """The arrays of a ``.npy`` / ``.npz`` file, never unpickled; one-line errors."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise CLIError(f"--input {quoted(path)}: not found" if not path.exists()
                       else f"--input {quoted(path)}: not a file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = [loaded]
        else:
            with loaded:
                arrays = [loaded[k] for k in loaded.files]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CLIError(f"--input {quoted(path)}: not a readable .npy / .npz array file "
                       f"({printable(str(exc).splitlines()[0] if str(exc) else '')[:120]})"
                       ) from None
    if not arrays or any(a.dtype.kind not in "fiub" for a in arrays):
        raise CLIError(f"--input {quoted(path)}: holds no numeric arrays")
    return arrays


# --------------------------------------------------------------------------- listings


def _cmd_techniques(args: argparse.Namespace) -> int:
    from nncompress.technique import all_multi_model_methods, all_techniques

    reg = all_techniques()
    rows = [[t.name, t.category, t.paper] for t in (reg.get(n) for n in reg.names())]
    emit(_table(["technique", "survey category", "paper"], rows))
    multi = all_multi_model_methods()
    emit("\nmethods over several models (not recipe stages; each is its own command):")
    emit(_table(["method", "command", "survey category", "takes", "paper"],
                [[m.name, f"nncompress {m.command}", m.category, m.inputs, m.paper]
                 for m in (multi.get(n) for n in multi.names())]))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from nncompress import models

    rows = [[s.name, s.default_dataset, s.description]
            for s in (models.spec(n) for n in models.model_names())]
    emit(_table(["model", "default data", "description"], rows))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from nncompress.recipe import Recipe

    for name in Recipe.names():
        emit(name)
    return 0


HANDLERS = {"demo": _cmd_demo, "train": _cmd_train, "compress": _cmd_compress,
            "inspect": _cmd_inspect, "export": _cmd_export, "run": _cmd_run,
            "techniques": _cmd_techniques,
            "models": _cmd_models, "recipes": _cmd_recipes}
