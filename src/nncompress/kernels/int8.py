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
        self._aligned = [self._arena(k) for k in range(self.threads)]
        self._dtypes = [torch.int64 if d == "int64" else torch.float32 for _, d, _ in info.inputs]
        self._moved = any(a != 0 for a in info.output_axes)
        # the common call -- one input, one batch-first output, one thread's worth of
        # samples -- checked and run with as little Python as possible (batch-1 latency)
        self._single = (len(info.inputs) == 1 and len(info.outputs) == 1
                        and not self._moved)
        self._in_shape = torch.Size(info.inputs[0][2]) if info.inputs else None
        self._out_shape = tuple(info.outputs[0][2]) if info.outputs else ()
        self._serial_below = 2 * info.block * max(2, self.threads)

    @property
    def arena_bytes(self) -> int:
        return self.info.arena_bytes

    def _arena(self, k: int) -> int:
        ptr = self._arenas[k].data_ptr()
        return (ptr + _ALIGN - 1) // _ALIGN * _ALIGN

    def _input(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Input ``k`` checked, as a contiguous CPU tensor of the engine's dtype (the same
        tensor when it already is one)."""
        name, _, shape = self.info.inputs[k]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[1:] != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"input {name!r}: expected [batch, {', '.join(map(str, shape))}], "
                            f"got {got}")
        if x.dtype is not self._dtypes[k] or not x.is_contiguous() or x.is_cuda:
            x = x.detach().to(device="cpu", dtype=self._dtypes[k]).contiguous()
        return x

    def _run(self, tensors: list[torch.Tensor], start: int, stop: int, slot: int) -> int:
        ptrs = [t[start:stop].data_ptr() for t in tensors]
        return self._fn(*ptrs, stop - start, self._arena(slot))

    def run_single(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output for one input tensor on the fast path (a contiguous CPU tensor of
        the engine's dtype and shape, a batch one thread runs), or None when the general
        :meth:`__call__` must handle it."""
        if not (self._single and isinstance(x, torch.Tensor) and x.dtype is self._dtypes[0]
                and x.shape[1:] == self._in_shape and x.is_contiguous() and x.is_cpu):
            return None
        batch = x.shape[0]
        if batch >= self._serial_below and self.threads > 1:
            return None
        y = torch.empty((batch, *self._out_shape))
        with self._lock:
            code = self._fn(x.data_ptr(), y.data_ptr(), batch, self._aligned[0])
        if code:
            raise DataError("int8 engine: an embedding id is out of range" if code == 1
                            else f"int8 engine: error code {code}")
        return y

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.info.inputs):
            raise DataError(f"the int8 engine takes {len(self.info.inputs)} inputs, got "
                            f"{len(inputs)}")
        xs = [self._input(x, k) for k, x in enumerate(inputs)]
        batch = xs[0].shape[0]
        if any(x.shape[0] != batch for x in xs):
            raise DataError(f"inputs with different batch sizes {[x.shape[0] for x in xs]}")
        ys = [torch.empty((batch, *shape)) for _, _, shape in self.info.outputs]
        workers = min(self.threads, batch // (2 * self.info.block))
        with self._lock:
            if workers <= 1:
                code = self._fn(*[t.data_ptr() for t in xs], *[t.data_ptr() for t in ys],
                                batch, self._aligned[0])
            else:
                code = self._parallel(xs + ys, batch, workers)
        if code:
            raise DataError("int8 engine: an embedding id is out of range" if code == 1
                            else f"int8 engine: error code {code}")
        if self._moved:
            return [self._place(y, axis) for y, axis in zip(ys, self.info.output_axes,
                                                            strict=True)]
        return ys

    def _parallel(self, tensors: list[torch.Tensor], batch: int, workers: int) -> int:
        """Split the batch in ``workers`` contiguous parts (whole blocks) run at once."""
        block = self.info.block
        step = -(-batch // (workers * block)) * block
        bounds = [(a, min(a + step, batch)) for a in range(0, batch, step)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, "nnc-int8")
        futures = [self._pool.submit(self._run, tensors, a, b, k)
                   for k, (a, b) in enumerate(bounds)]
        codes = [f.result() for f in futures]
        return 1 if 1 in codes else max(codes)

    @staticmethod
    def _place(y: torch.Tensor, axis: int | None) -> torch.Tensor:
        """A batch-first output with its batch axis where the program has it."""
        if axis is None:
            return y[0].clone() if y.shape[0] else torch.zeros(y.shape[1:])
        return y.movedim(0, axis) if axis else y

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
