"""Export a model to a deployment form: ``export(model_or_program, path, example, format)``.

The deployed form is the product (design principle 15): what a user runs on a device.
``nc.export(model, path, example, format)`` is :func:`export` (this package is callable).
The forms: ``"c"`` -- an integer program as dependency-free C99 for microcontrollers
(``model.c`` + ``model.h`` in the directory ``path``, :mod:`nncompress.export.c_source`) --
and ``"onnx"``:

- an integer :class:`~nncompress.quant.program.Program`, or a module holding one (the int8
  model of :mod:`nncompress.quant.int8`): exact integer ONNX (``MatMulInteger`` /
  ``ConvInteger`` and the fixed-point requantization of Jacob et al., 2018, in int64 ops)
  that ONNX Runtime runs bit-exactly like :mod:`nncompress.quant.reference`
  (:mod:`nncompress.export.onnx_int8`);
- any other ``nn.Module``: float ONNX through PyTorch's TorchScript exporter
  (:mod:`nncompress.export.onnx_torch`), its outputs compared with torch's.

**Registering an exporter.** An :class:`Exporter` is registered in :data:`EXPORTERS` under
``"<format>:<key>"``, ``key`` being ``"program"`` (anything that holds an integer program),
a module class's qualified name (``"nncompress.quant.binary.BinaryMLP"``: that class and its
subclasses) or ``"module"`` (any ``nn.Module``, the fallback). For an object, the lookup
tries its class's qualified names along the MRO first, then ``"program"``, then
``"module"``. A layer type inside an ordinary model that PyTorch's ONNX exporter cannot
trace registers a *stand-in* instead, in :data:`LAYER_FORMS` under
``"onnx:<qualified class name>"``: a function returning an equivalent module that traces
(e.g. a float layer holding its dequantized weights, or one whose forward calls an
``autograd.Function`` with a ``symbolic``). Registrations live in the module that defines
the layer or the exporter; the package is listed once in :data:`EXPORTER_PACKAGES`, which
:func:`exporters` imports on first use (a listed package that does not exist yet is
skipped)::

    from nncompress.export import LAYER_FORMS
    LAYER_FORMS.register("onnx:nncompress.quant.binary_layers.BinaryLinear", to_float_linear)

A model that cannot be exported raises one line naming the first layer (or program op)
that has no export form (:class:`~nncompress.errors.UnsupportedLayerError`).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from nncompress.errors import NNCError, UnsupportedLayerError
from nncompress.registry import Registry

__all__ = ["EXPORTERS", "EXPORTER_PACKAGES", "LAYER_FORMS", "ExportResult", "Exporter",
           "export", "export_bytes", "exporter_for", "exporters", "formats", "program_of",
           "write_atomic", "write_result"]


@dataclass(frozen=True)
class ExportResult:
    """An exported model: the file's ``data``, the exporter's ``name``, and how its outputs
    were checked against ours on the example: ``exact`` (bit for bit), ``max_abs_diff``
    (largest output difference) and a one-line ``check`` for people; ``notes``: what a
    user should know (ops kept in float, fixed sequence lengths, ...). A format that writes
    several files (C: ``model.c`` + ``model.h``) lists them in ``files`` (name, bytes) and is
    written into a directory; ``flash_bytes`` / ``ram_bytes`` where the format measures
    them (C: ``size`` on the compiled object)."""

    data: bytes
    exporter: str
    exact: bool
    max_abs_diff: float
    check: str
    notes: tuple[str, ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()
    flash_bytes: int | None = None
    ram_bytes: int | None = None


@dataclass(frozen=True)
class Exporter:
    """One way to export: ``name``, the ``format`` it writes, a ``summary`` and
    ``run(obj, example) -> ExportResult`` (``example``: model inputs, batch first)."""

    name: str
    format: str
    summary: str
    run: Callable[[Any, Any], ExportResult]


#: ``"<format>:<key>"`` -> Exporter; see the module docstring.
EXPORTERS: Registry[Exporter] = Registry("exporter", error=UnsupportedLayerError)
#: ``"<format>:<qualified layer class>"`` -> a function returning a traceable stand-in.
LAYER_FORMS: Registry[Callable[[nn.Module], nn.Module]] = Registry(
    "layer export form", error=UnsupportedLayerError)

#: Packages whose import registers exporters or layer forms (imported by :func:`exporters`).
EXPORTER_PACKAGES: tuple[str, ...] = (
    "nncompress.export.onnx_int8",          # integer programs (int8 models)
    "nncompress.export.onnx_torch",         # any nn.Module (float ONNX)
    "nncompress.export.onnx_quant_layers",  # binary / low-bit layers (stand-ins)
    "nncompress.export.c_source",           # integer programs as dependency-free C99
)


def exporters() -> Registry[Exporter]:
    """The filled registry: every package of :data:`EXPORTER_PACKAGES` imported (once; a
    listed package that does not exist is skipped, any other import error propagates)."""
    for package in EXPORTER_PACKAGES:
        if package in sys.modules:
            continue
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name is None or not package.startswith(exc.name):
                raise
    return EXPORTERS


def formats() -> tuple[str, ...]:
    """The formats some exporter writes (``("onnx",)`` today)."""
    return tuple(sorted({exporters().get(k).format for k in exporters().names()}))


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def program_of(obj: Any) -> Any:
    """The integer program ``obj`` is or holds (a module's ``current_program()`` or
    ``program``), else None."""
    from nncompress.quant.program import Program

    if isinstance(obj, Program):
        return obj
    current = getattr(obj, "current_program", None)
    if isinstance(obj, nn.Module) and callable(current):
        found = current()
        return found if isinstance(found, Program) else None
    held = getattr(obj, "program", None)
    return held if isinstance(held, Program) else None


def exporter_for(obj: Any, format: str = "onnx") -> Exporter:
    """The exporter for ``obj`` in ``format`` (lookup order in the module docstring)."""
    reg = exporters()
    known = formats()
    if format not in known:
        raise NNCError(f"unknown export format {format!r}; known: {', '.join(known)}")
    keys = [f"{format}:{qualified_name(c)}" for c in type(obj).__mro__
            if c not in (nn.Module, object)]
    if program_of(obj) is not None:
        keys.append(f"{format}:program")
    if isinstance(obj, nn.Module):
        keys.append(f"{format}:module")
    for key in keys:
        if key in reg:
            return reg.get(key)
    raise UnsupportedLayerError(f"cannot export a {type(obj).__name__} to {format}: it is "
                                "neither an nn.Module nor an integer program")


def export_bytes(obj: Any, example: Any = None, format: str = "onnx") -> ExportResult:
    """``obj`` (a module or an integer program) exported to ``format`` in memory, checked
    against our own execution on ``example`` (model inputs, batch first)."""
    return exporter_for(obj, format).run(obj, example)


def write_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so ``path`` never holds a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp's 0600 -> what open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_result(result: ExportResult, path: str | Path) -> None:
    """Write ``result`` to ``path``: one file, or for a multi-file format the directory
    ``path`` (created if missing) with each file written whole."""
    if not result.files:
        write_atomic(result.data, path)
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NNCError(f"{path} exists and is not a directory (the {result.exporter} export "
                       "writes a directory)")
    path.mkdir(parents=True, exist_ok=True)
    for name, data in result.files:
        write_atomic(data, path / name)


def export(obj: Any, path: str | Path, example: Any = None, format: str = "onnx"
           ) -> ExportResult:
    """Export ``obj`` to ``path`` in ``format`` (see the module docstring; ``"c"`` writes
    the directory ``path``); nothing is written unless the export and its check succeed."""
    result = export_bytes(obj, example, format)
    write_result(result, path)
    return result


class _ExportModule(types.ModuleType):
    """This package, callable: ``nc.export(model, path, example, format)`` is
    :func:`export` (the package is also where the exporters live)."""

    def __call__(self, obj: Any, path: str | Path, example: Any = None, format: str = "onnx"
                 ) -> ExportResult:
        return export(obj, path, example, format)


sys.modules[__name__].__class__ = _ExportModule
