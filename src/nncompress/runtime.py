"""Run what was exported, behind one call: ``nc.runtime.load(path).predict(x)``.

``path`` is one of

- a ``.onnx`` file: an ONNX Runtime session (all graph optimisations, ``threads`` intra-op
  threads, sequential execution);
- a directory written by the C export (``model.c`` + ``model.h``,
  :mod:`nncompress.export.c_source`): the source compiled with this machine's gcc
  (``-O3 -march=native``, cached by hash) and called through ``ctypes`` -- the batch runs in
  one C call;
- a ``.nnc`` file: the eager PyTorch module :func:`nncompress.load` gives (int8 models run
  their compiled engine).

``predict`` takes a batch-first numpy array or torch tensor (a tuple for several inputs)
and returns float32 numpy arrays (a tuple for several outputs). Wrong shapes give a
one-line :class:`~nncompress.errors.DataError` naming what was expected.
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nncompress.errors import DataError, NNCError, raise_if_interrupted

__all__ = ["Deployed", "load"]

_CHAR, _address = ctypes.c_char, ctypes.addressof
_HEADER_IO = re.compile(r"#define (\w+)_(INPUT|OUTPUT)(\d+)_NUMEL (\d+)\s+/\* (.*): (\w+) "
                        r"\[([0-9, ]*)\] per sample \*/")


class Deployed:
    """A loaded deployment form: ``form`` ("onnx", "c" or "torch"), ``path``, the
    per-sample ``input_shapes`` / ``input_dtypes`` (numpy dtypes) and
    :meth:`predict`."""

    form: str = ""

    def __init__(self, path: Path, input_shapes: Sequence[tuple[int, ...] | None],
                 input_dtypes: Sequence[np.dtype]) -> None:
        self.path = path
        self.input_shapes = [None if s is None else tuple(s) for s in input_shapes]
        self.input_dtypes = list(input_dtypes)

    def _inputs(self, x: Any) -> list[np.ndarray]:
        xs = list(x) if isinstance(x, (tuple, list)) else [x]
        if len(xs) != len(self.input_shapes):
            raise DataError(f"{self.path.name} takes {len(self.input_shapes)} input(s), got "
                            f"{len(xs)}")
        out = []
        for k, (a, shape, dtype) in enumerate(zip(xs, self.input_shapes, self.input_dtypes,
                                                  strict=True)):
            if hasattr(a, "detach"):
                a = a.detach().cpu().numpy()
            a = np.ascontiguousarray(np.asarray(a), dtype=dtype)
            if a.ndim < 1 or (shape is not None and tuple(a.shape[1:]) != shape):
                want = "?" if shape is None else ", ".join(map(str, shape))
                raise DataError(f"input {k}: expected [batch, {want}], got {list(a.shape)}")
            out.append(a)
        if len({a.shape[0] for a in out}) > 1:
            raise DataError(f"inputs with different batch sizes {[a.shape[0] for a in out]}")
        return out

    def predict(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """The model's outputs on the batch ``x`` (float32 numpy)."""
        ys = self._run(self._inputs(x))
        return ys[0] if len(ys) == 1 else tuple(ys)

    def _run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the form holds (nothing by default)."""

    def __repr__(self) -> str:
        return f"Deployed({self.form}, {self.path.name})"


class OnnxDeployed(Deployed):
    """An ONNX file in an ONNX Runtime session."""

    form = "onnx"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise_if_interrupted(exc)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise NNCError(f"{path}: not a loadable ONNX model ({first})") from None
        ins = self.session.get_inputs()
        self._names = [i.name for i in ins]
        shapes = [tuple(d if isinstance(d, int) else -1 for d in i.shape[1:]) for i in ins]
        super().__init__(path, [None if -1 in s else s for s in shapes],
                         [np.int64 if "int64" in i.type else np.float32 for i in ins])

    def _run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        ys = self.session.run(None, dict(zip(self._names, xs, strict=True)))
        return [np.asarray(y, dtype=np.float32) for y in ys]


class CDeployed(Deployed):
    """A C export directory compiled into a shared library, called through ctypes."""

    form = "c"

    def __init__(self, folder: Path) -> None:
        from nncompress.kernels import cbuild

        source = _read(folder / "model.c")
        header = _read(folder / "model.h")
        io = _HEADER_IO.findall(header)
        prefixes = {m[0] for m in io}
        if not io or len(prefixes) != 1 or "OUTPUT" not in {m[1] for m in io}:
            raise NNCError(f"{folder / 'model.h'}: not a header written by nncompress's C "
                           "export (no NNC_INPUT/OUTPUT lines)")
        prefix = prefixes.pop().lower()
        ins = sorted((int(m[2]), m) for m in io if m[1] == "INPUT")
        outs = sorted((int(m[2]), m) for m in io if m[1] == "OUTPUT")
        shapes = [tuple(int(v) for v in m[6].split(",") if v.strip()) for _, m in ins]
        self._out_shapes = [tuple(int(v) for v in m[6].split(",") if v.strip())
                            for _, m in outs]
        arena = re.search(rf"#define {prefix.upper()}_ARENA_BYTES (\d+)", header)
        if arena is None:
            raise NNCError(f"{folder / 'model.h'}: no {prefix.upper()}_ARENA_BYTES")
        # the header sits beside the source; compile them as one unit
        unit = source.replace('#include "model.h"', header, 1)
        self._lib = cbuild.compile_source("c_export", unit)
        self._fn = getattr(self._lib, f"{prefix}_run")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p] * (len(ins) + len(outs)) + [ctypes.c_int32,
                                                                          ctypes.c_void_p]
        self._arena = np.zeros(int(arena.group(1)) + 128, dtype=np.uint8)
        self._base = -(-self._arena.ctypes.data // 64) * 64
        super().__init__(folder, shapes,
                         [np.dtype(np.int64 if m[5] == "int64" else np.float32) for _, m in ins])
        self._single = len(ins) == 1 and len(outs) == 1

    def predict(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """As :meth:`Deployed.predict`; one contiguous array of the right dtype and shape
        goes straight to the C call (batch-1 latency); so does a CPU torch tensor (viewed
        as one without a copy)."""
        if type(x) is not np.ndarray and _is_cpu_tensor(x):
            x = x.numpy()
        if (self._single and type(x) is np.ndarray and x.dtype == self.input_dtypes[0]
                and x.shape[1:] == self.input_shapes[0] and x.flags.c_contiguous
                and x.flags.writeable and x.size):
            y = np.empty((x.shape[0], *self._out_shapes[0]), dtype=np.float32)
            # addressof(from_buffer) costs half of ndarray.ctypes.data
            code = self._fn(_address(_CHAR.from_buffer(x)), _address(_CHAR.from_buffer(y)),
                            x.shape[0], self._base)
            if code:
                self._fail(code)
            return y
        return super().predict(x)

    @staticmethod
    def _fail(code: int) -> None:
        raise DataError("the C model: an embedding id is out of range" if code == 1
                        else f"the C model returned error code {code}")

    def _run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        batch = xs[0].shape[0]
        ys = [np.empty((batch, *s), dtype=np.float32) for s in self._out_shapes]
        code = self._fn(*[a.ctypes.data for a in xs], *[y.ctypes.data for y in ys], batch,
                        self._base)
        if code:
            self._fail(code)
        return ys


class TorchDeployed(Deployed):
    """A ``.nnc`` file as the eager module :func:`nncompress.load` gives."""

    form = "torch"

    def __init__(self, path: Path) -> None:
        from nncompress import api

        self.model = api.load(path).eval()
        super().__init__(path, [None], [np.float32])

    def _inputs(self, x: Any) -> list[np.ndarray]:
        return list(x) if isinstance(x, (tuple, list)) else [x]

    def _run(self, xs: list[Any]) -> list[np.ndarray]:
        import torch

        ts = [torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
              for a in xs]
        ts = [t.float() if t.is_floating_point() else t for t in ts]
        with torch.no_grad():
            out = self.model(*ts)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().numpy() for o in outs]


def _is_cpu_tensor(x: Any) -> bool:
    """Whether ``x`` is a plain CPU torch tensor that needs no gradient (without importing
    torch when it is not loaded): ``x.numpy()`` views it without a copy."""
    torch = sys.modules.get("torch")
    return (torch is not None and type(x) is torch.Tensor and x.is_cpu
            and not x.requires_grad)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise NNCError(f"{path}: not found (a C export directory holds model.c and "
                       "model.h)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NNCError(f"{path}: cannot read it ({exc.__class__.__name__})") from None


def load(path: str | Path, *, threads: int = 1) -> Deployed:
    """The deployed model at ``path`` (see the module docstring); ``threads``: ONNX
    Runtime's intra-op threads."""
    path = Path(path)
    if threads < 1:
        raise NNCError(f"threads must be >= 1, got {threads}")
    if path.is_dir():
        return CDeployed(path)
    if not path.exists():
        raise NNCError(f"{path}: not found")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxDeployed(path, threads)
    if suffix == ".nnc":
        return TorchDeployed(path)
    raise NNCError(f"{path}: not a deployable form (a .onnx file, a C export directory or "
                   "a .nnc file)")
