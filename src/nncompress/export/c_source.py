"""Dependency-free C99 for microcontroller-class devices: ``export(model, DIR, example,
format="c")`` writes ``DIR/model.c`` and ``DIR/model.h``.

The model holds an integer program (an int8 model: :func:`nncompress.quant.int8.quantize_int8`,
recipe ``int8``), or it is a float model that is quantized first, calibrated on the example
(:func:`quantize_for_export`: give at least 32 representative samples; the CLI takes
``--data``); binarized models convert the same way and keep their +-1 weights at one bit.
The source is :func:`nncompress.kernels.int8_codegen.generate_c` specialised to one sample
per pass (the smallest arena) plus a fixed arena and a one-sample entry point::

    #include "model.h"
    float out[NNC_OUTPUT0_NUMEL];
    nnc_predict(input, out);                 /* one sample, the static arena */
    nnc_run(input, out, batch, my_arena);    /* a batch, an arena of NNC_ARENA_BYTES */

Integer-only arithmetic (Jacob et al., 2018; the integer reference
:mod:`nncompress.quant.reference` is the specification), weights as ``static const`` arrays
(int8; packed bits for +-1 weights), no ``malloc``, nothing from libc beyond ``<stdint.h>``
and ``<string.h>`` (``memcpy``); the AVX-512 VNNI path stays behind ``#if`` and is compiled
only with ``-march`` flags that enable it. A program with ops computed in float (LayerNorm,
softmax: the transformer) is refused, naming the layer: it would need ``<math.h>``.

The export compiles the source with ``gcc -std=c99 -Wall -Wextra -Werror -O2`` (a warning
fails it), reads flash and RAM from ``size`` on the object (flash = text + data: code and
const arrays; RAM = data + bss: the arena, which also holds recurrent state; the stack is
not counted), and runs the compiled code on the example against the integer reference: it
must be equal bit for bit, or nothing is written. Without gcc the files are written
unchecked, and the notes say so.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nncompress.errors import KernelUnavailableError, NNCError, UnsupportedLayerError
from nncompress.export import EXPORTERS, Exporter, ExportResult, program_of
from nncompress.kernels.int8_codegen import CInfo, generate_c
from nncompress.quant.program import Program

__all__ = ["C_FILES", "MCU_FLAGS", "MIN_CALIBRATION", "CSource", "c_source", "compile_object",
           "export_c", "object_sizes", "quantize_for_export"]

#: the strict flags every export is compiled with (no -march: what any gcc target takes)
MCU_FLAGS: tuple[str, ...] = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-O2")
#: the files one export writes
C_FILES: tuple[str, str] = ("model.c", "model.h")
_PREFIX = "nnc"


@dataclass(frozen=True)
class CSource:
    """A generated pair: ``source`` (model.c), ``header`` (model.h), the generator's
    :class:`~nncompress.kernels.int8_codegen.CInfo`, and where measured, ``sizes``
    (``text``, ``data``, ``bss`` bytes of the object from ``size``)."""

    source: str
    header: str
    info: CInfo
    sizes: dict[str, int] | None = None

    @property
    def flash_bytes(self) -> int | None:
        """Code + const data + initialised data (``text + data``)."""
        return None if self.sizes is None else self.sizes["text"] + self.sizes["data"]

    @property
    def ram_bytes(self) -> int | None:
        """The static arena (activations and recurrent state) + initialised data."""
        return None if self.sizes is None else self.sizes["data"] + self.sizes["bss"]


def _refuse_float(program: Program) -> None:
    ops = program.float_ops()
    if ops:
        op = ops[0]
        what = op.attrs.get("op", op.kind) if isinstance(op.attrs, dict) else op.kind
        raise UnsupportedLayerError(
            f"layer {op.source or op.outputs[0]!r} ({what}) computes in float and would need "
            f"<math.h>: the microcontroller C export takes integer-only programs "
            f"({len(ops)} float op(s); export to ONNX instead)")


def c_source(program: Program, sample_shapes: Sequence[Sequence[int]]) -> CSource:
    """The ``model.c`` / ``model.h`` pair of an integer-only ``program`` on samples shaped
    ``sample_shapes`` (one per input), one sample per pass, with a static arena and
    ``nnc_predict`` for one sample. Raises UnsupportedLayerError naming a float op or an
    op the generator has no C for."""
    _refuse_float(program)
    body, header, info = generate_c(program, [tuple(s) for s in sample_shapes], block=1,
                                    prefix=_PREFIX, compact=True)
    up = _PREFIX.upper()
    ins = ", ".join(["const void *input"] if len(info.inputs) == 1 else
                    [f"const void *input{k}" for k in range(len(info.inputs))])
    outs = ", ".join(["float *output"] if len(info.outputs) == 1 else
                     [f"float *output{k}" for k in range(len(info.outputs))])
    names = ", ".join(re.findall(r"\*(\w+)", f"{ins}, {outs}"))
    predict = (f"int {_PREFIX}_predict({ins}, {outs})")
    source = (f'#include "{C_FILES[1]}"\n' + body
              + f"\n/* the fixed activation arena: {info.arena_bytes} bytes, computed at "
              + "export */\n"
              + f"static uint8_t NNC_ALIGNED {_PREFIX}_arena[{up}_ARENA_BYTES > 0 ? "
              + f"{up}_ARENA_BYTES : 1];\n\n"
              + f"/* one sample through the static arena; 0 on success */\n{predict} {{\n"
              + f"    return {info.entry}({names}, 1, {_PREFIX}_arena);\n}}\n")
    guard = f"#endif /* {up}_MODEL_H */"
    header = header.replace(guard, f"/* one sample, the model's own static arena */\n"
                                   f"{predict};\n{guard}")
    return CSource(source, header, info)


def _run_tool(cmd: list[str], what: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailableError(f"{what}: {exc}") from None
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln),
                     done.stderr.strip()[:300])
        raise KernelUnavailableError(f"{what}: {cmd[0]} failed (exit {done.returncode}): "
                                     f"{first}")
    return done.stdout


def compile_object(c: CSource, folder: Path, flags: Sequence[str] = MCU_FLAGS,
                   shared: bool = False) -> Path:
    """Write the pair into ``folder`` and compile ``model.c`` with ``flags`` (a shared
    library with ``shared``); returns the output's path. KernelUnavailableError when gcc
    is missing or fails (a warning fails: ``-Werror``)."""
    if shutil.which("gcc") is None:
        raise KernelUnavailableError("the C export's check needs gcc, which is not on PATH")
    (folder / C_FILES[0]).write_text(c.source)
    (folder / C_FILES[1]).write_text(c.header)
    out = folder / ("model.so" if shared else "model.o")
    extra = ["-shared", "-fPIC"] if shared else ["-c"]
    _run_tool(["gcc", *flags, *extra, "-o", str(out), str(folder / C_FILES[0])],
              "compiling the exported C")
    return out


def object_sizes(obj: Path) -> dict[str, int]:
    """``text``, ``data`` and ``bss`` bytes of a compiled object (binutils ``size``,
    Berkeley format)."""
    if shutil.which("size") is None:
        raise KernelUnavailableError("measuring flash / RAM needs binutils' size, not on PATH")
    lines = _run_tool(["size", str(obj)], "size").strip().splitlines()
    fields = lines[-1].split()
    return {"text": int(fields[0]), "data": int(fields[1]), "bss": int(fields[2])}


def _check(c: CSource, program: Program, xs: list[torch.Tensor], folder: Path) -> float:
    """Largest difference between the compiled export (built with :data:`MCU_FLAGS`, run
    through the int8 engine's ctypes wrapper) and the integer reference on the example
    (raises when the build fails)."""
    from nncompress.kernels.int8 import Engine
    from nncompress.quant.reference import run

    lib = ctypes.CDLL(str(compile_object(c, folder, MCU_FLAGS, shared=True)))
    got = Engine(lib, c.info, c.source, c.header, threads=1)(*xs)
    want = run(program, *xs)
    return max((float((g - w).abs().max()) for g, w in zip(got, want, strict=True)
                if g.numel()), default=0.0)


def _inputs(program: Program, example: Any) -> list[torch.Tensor]:
    if example is None:
        raise NNCError("the C export needs an example input (a batch of samples) to size the "
                       "arena and check the compiled code against the integer reference")
    from nncompress.export.onnx_int8 import example_tensors

    xs = list(example_tensors(example, program.inputs))
    if len(xs) != len(program.inputs):
        raise NNCError(f"the program takes {len(program.inputs)} input(s), the example has "
                       f"{len(xs)}")
    dtypes = [torch.int64 if program.values[n].dtype == "int64" else torch.float32
              for n in program.inputs]
    return [x.detach().to("cpu", d).contiguous() for x, d in zip(xs, dtypes, strict=True)]


#: fewest example samples a float model's int8 conversion is calibrated on
MIN_CALIBRATION = 32


def quantize_for_export(model: Any, example: Any) -> tuple[Any, list[str]]:
    """A float ``model`` converted to int8 (:func:`~nncompress.quant.int8.quantize_int8`,
    post-training, no labels) calibrated on ``example`` (one tensor of at least
    :data:`MIN_CALIBRATION` representative samples), as TFLite's converter does with its
    representative dataset; the notes say so. The model handed in is not modified."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nncompress.data import Dataset
    from nncompress.quant.int8 import QuantizeInt8Config, quantize_int8
    from nncompress.technique import Context

    if not isinstance(model, nn.Module):
        raise UnsupportedLayerError(f"cannot export a {type(model).__name__} to C: neither an "
                                    "nn.Module nor an integer program")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 \
            or len(example) < MIN_CALIBRATION:
        got = (f"{len(example)} sample(s)" if isinstance(example, torch.Tensor)
               and example.dim() else type(example).__name__)
        raise NNCError(
            f"a float {type(model).__name__} is quantized to int8 for the C export and needs at "
            f"least {MIN_CALIBRATION} representative samples as the example to calibrate on "
            f"(got {got}); or quantize it first (recipe 'int8' / quantize_int8)")
    x = example.detach().cpu()
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.int64)),
                        batch_size=64)
    ctx = Context(data=Dataset("export calibration", loader, loader, tuple(x.shape[1:]), 1),
                  progress=False)
    quantized = quantize_int8(model, QuantizeInt8Config(calibration_batches=1_000), ctx)
    return quantized, [f"quantized to int8 for the C export (quantize_int8, calibrated on the "
                       f"{len(x)} example samples): measure this form's accuracy", *ctx.log]


def export_c(obj: Any, example: Any) -> ExportResult:
    """The C export of ``obj`` (see the module docstring) as an :class:`ExportResult`
    whose ``files`` are ``model.c`` and ``model.h``."""
    program, notes = program_of(obj), []
    if program is None:
        obj, notes = quantize_for_export(obj, example)
        program = program_of(obj)
    xs = _inputs(program, example)
    c = c_source(program, [tuple(x.shape[1:]) for x in xs])
    notes.append(f"arena {c.info.arena_bytes} B (one sample per pass), const data "
                 f"{c.info.const_bytes} B")
    try:
        with tempfile.TemporaryDirectory(prefix="nnc-cexport-") as tmp:
            sizes = object_sizes(compile_object(c, Path(tmp)))
            diff = _check(c, program, xs, Path(tmp))
    except KernelUnavailableError as exc:
        return ExportResult(c.source.encode(), "c99", False, float("nan"),
                            f"not compiled or checked: {exc}", (*notes,),
                            files=((C_FILES[0], c.source.encode()),
                                   (C_FILES[1], c.header.encode())))
    if diff != 0.0:
        raise NNCError(f"the compiled C differs from the integer reference by {diff:.3g} on "
                       "the example (a bug in the generator): nothing written")
    c = CSource(c.source, c.header, c.info, sizes)
    check = (f"gcc {' '.join(MCU_FLAGS)}: no warnings; equal to the integer reference bit "
             f"for bit on {xs[0].shape[0]} example sample(s)")
    notes.append(f"flash {c.flash_bytes} B (text {sizes['text']} + data {sizes['data']}), "
                 f"RAM {c.ram_bytes} B (arena in bss {sizes['bss']} + data {sizes['data']}; "
                 "stack not counted)")
    return ExportResult(c.source.encode(), "c99", True, 0.0, check, tuple(notes),
                        files=((C_FILES[0], c.source.encode()),
                               (C_FILES[1], c.header.encode())),
                        flash_bytes=c.flash_bytes, ram_bytes=c.ram_bytes)


EXPORTERS.register("c:program", Exporter(
    "c99", "c", "integer program as dependency-free C99 (model.c / model.h)", export_c))
EXPORTERS.register("c:module", Exporter(
    "c99", "c", "integer program as dependency-free C99 (model.c / model.h)", export_c))
