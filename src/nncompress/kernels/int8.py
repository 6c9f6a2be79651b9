"""The fast int8 path: an integer program compiled to C and called once per batch.

Integer-arithmetic-only inference (Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018). Eager per-op overhead
dominates small models at batch 1, so :func:`compile_program` generates one C translation
unit specialised to the program and its per-sample input shapes
(:func:`~nncompress.kernels.int8_codegen.generate_c`), compiles it with this machine's gcc
(``-O3 -march=native``, cached by hash: :func:`nncompress.kernels.cbuild.compile_source`)
and returns an :class:`Engine`: ``engine(*inputs) -> [float32 outputs]``, equal to
:func:`nncompress.quant.reference.run` bit for bit (``float`` ops: within 1 int8 step where
float32 and double round differently; see ``c/int8_float.h``).

Where gcc is missing or the build fails, :class:`~nncompress.errors.KernelUnavailableError`
says why and the caller falls back to the reference.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from nncompress.errors import DataError
from nncompress.kernels import cbuild
from nncompress.kernels.int8_codegen import CInfo, generate_c
from nncompress.quant.program import Program

__all__ = ["Engine", "compile_program"]

_ALIGN = 64


class Engine:
    """A compiled integer program: ``engine(*inputs)`` -> list of float32 outputs.

    Inputs are batch-first tensors shaped ``[B, *sample_shape]`` (float32 features or int64
    ids). Batches of at least ``2 * block`` samples per thread are split over ``threads``
    threads (the C call releases the GIL), each with its own arena. Calls are serialised
    by a lock (one arena per thread slot).
    """

    def __init__(self, library: ctypes.CDLL, info: CInfo, source: str, header: str,
                 threads: int = 1) -> None:
        self.info, self.source, self.header = info, source, header
        self.threads = max(1, int(threads))
        self._fn = getattr(library, info.entry)
        n = len(info.inputs) + len(info.outputs)
        self._fn.argtypes = [ctypes.c_void_p] * n + [ctypes.c_int32, ctypes.c_void_p]
        self._fn.restype = ctypes.c_int
        self._arenas = [torch.empty(info.arena_bytes + _ALIGN, dtype=torch.uint8)
                        for _ in range(self.threads)]
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._numel_in = [math.prod(s) for _, _, s in info.inputs]

    @property
    def arena_bytes(self) -> int:
        return self.info.arena_bytes

    def _arena(self, k: int) -> int:
        ptr = self._arenas[k].data_ptr()
        return (ptr + _ALIGN - 1) // _ALIGN * _ALIGN

    def _inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.info.inputs):
            raise DataError(f"the int8 engine takes {len(self.info.inputs)} inputs, got "
                            f"{len(inputs)}")
        out = []
        for x, (name, dtype, shape) in zip(inputs, self.info.inputs, strict=True):
            if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != shape or x.dim() < 1:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise DataError(f"input {name!r}: expected [batch, {', '.join(map(str, shape))}]"
                                f", got {got}")
            want = torch.int64 if dtype == "int64" else torch.float32
            out.append(x.detach().to(device="cpu", dtype=want).contiguous())
        batch = {int(x.shape[0]) for x in out}
        if len(batch) != 1:
            raise DataError(f"inputs with different batch sizes {sorted(batch)}")
        return out

    def _run(self, xs: list[torch.Tensor], ys: list[torch.Tensor], start: int, stop: int,
             slot: int) -> int:
        ptrs = [t[start:stop].data_ptr() if stop > start else t.data_ptr() for t in xs + ys]
        return self._fn(*ptrs, stop - start, self._arena(slot))

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        xs = self._inputs(inputs)
        batch = int(xs[0].shape[0])
        ys = [torch.empty((batch, *shape), dtype=torch.float32)
              for _, _, shape in self.info.outputs]
        block = self.info.block
        workers = min(self.threads, batch // (2 * block))
        with self._lock:
            if workers <= 1:
                codes = [self._run(xs, ys, 0, batch, 0)]
            else:
                step = -(-batch // (workers * block)) * block
                bounds = [(a, min(a + step, batch)) for a in range(0, batch, step)]
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, "nnc-int8")
                futures = [self._pool.submit(self._run, xs, ys, a, b, k)
                           for k, (a, b) in enumerate(bounds)]
                codes = [f.result() for f in futures]
        if any(codes):
            raise DataError("int8 engine: an embedding id is out of range" if 1 in codes
                            else f"int8 engine: error code {max(codes)}")
        return ys

    def close(self) -> None:
        """Stop the worker threads (if any were started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def compile_program(program: Program, sample_shapes: Sequence[Sequence[int]], *,
                    block: int = 8, threads: int | None = None,
                    flags: tuple[str, ...] = cbuild.FLAGS) -> Engine:
    """Generate, compile (cached by hash) and load the C engine of ``program`` for inputs
    shaped ``[B, *sample_shapes[k]]``. ``threads`` defaults to torch's intra-op threads.
    Raises KernelUnavailableError when gcc is missing or the build fails, and
    UnsupportedLayerError naming an op the engine cannot run."""
    source, header, info = generate_c(program, [tuple(s) for s in sample_shapes], block=block)
    library = cbuild.compile_source("int8_engine", source, tuple(flags))
    return Engine(library, info, source, header,
                  threads if threads is not None else torch.get_num_threads())
