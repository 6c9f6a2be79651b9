"""Static layout of an integer program for the generated C engine: shapes, batch axes,
data-movement maps and the arena.

The program (:mod:`nncompress.quant.program`) is written for batched tensors; the engine runs
it one sample (or one block of samples) at a time. :func:`infer_values` runs the integer
reference (:mod:`nncompress.quant.reference`) at batch 2 and 3 to learn every value's shape
and which axis is the batch (or that a value does not depend on the batch, e.g. a ``const``).
A value's per-sample storage is its tensor without the batch axis, row-major.

Data movement (reshape, transpose, index, broadcasting, ...) is found by running the
reference op on *index tensors* (each element holds its own per-sample offset, plus
``sample * BIG``): the result says, for every output element, which input element it reads
(:func:`sample_gather`), and that map is then emitted as an alias, a strided copy
(:func:`strided`) or, failing both, a gather table. The same semantics as the reference by
construction, whatever the op's attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nncompress.errors import DataError, UnsupportedLayerError
from nncompress.quant import reference
from nncompress.quant.program import Op, Program

__all__ = ["BIG", "Block", "Strided", "ValueInfo", "index_tensor", "infer_values",
           "pack_weights", "pad_k", "plan_arena", "sample_gather", "strided"]

#: The per-sample tag of index tensors (larger than any per-sample element count).
BIG = 1 << 32
_CTYPES = {"int8": ("int8_t", 1), "float32": ("float", 4), "int64": ("int64_t", 8)}


@dataclass(frozen=True)
class ValueInfo:
    """One value of the program as the engine stores it.

    ``shape``: per sample (the batch axis removed); ``batch_axis``: its position in the
    batched tensor, ``None`` for a value that does not depend on the batch; ``full``: the
    batched shape at batch 2.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int | None
    full: tuple[int, ...]

    @property
    def batched(self) -> bool:
        return self.batch_axis is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ctype(self) -> str:
        return _CTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return _CTYPES[self.dtype][1]

    def sample_dim(self, dim: int) -> int:
        """The per-sample axis of batched-tensor axis ``dim`` (negative allowed); raises
        UnsupportedLayerError when ``dim`` is the batch axis."""
        d = dim % len(self.full)
        if d == self.batch_axis:
            raise UnsupportedLayerError(f"value {self.name!r}: an op works along the batch axis")
        return d - 1 if self.batch_axis is not None and d > self.batch_axis else d


def _shapes(program: Program, sample_shapes: Sequence[Sequence[int]], batch: int
            ) -> dict[str, tuple[int, ...]]:
    try:
        return reference.shapes_at(program, sample_shapes, batch)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"sample shapes {[tuple(s) for s in sample_shapes]} do not fit the "
                        f"program: {first}") from None


def infer_values(program: Program, sample_shapes: Sequence[Sequence[int]]
                 ) -> dict[str, ValueInfo]:
    """Every value's :class:`ValueInfo` for per-sample input shapes ``sample_shapes``."""
    if len(sample_shapes) != len(program.inputs):
        raise DataError(f"the program takes {len(program.inputs)} inputs, got "
                        f"{len(sample_shapes)} sample shapes")
    two, three = _shapes(program, sample_shapes, 2), _shapes(program, sample_shapes, 3)
    infos: dict[str, ValueInfo] = {}
    for name, full in two.items():
        other = three[name]
        diff = [d for d, (a, b) in enumerate(zip(full, other, strict=False)) if a != b]
        if len(full) != len(other) or len(diff) > 1 or (diff and (full[diff[0]], other[diff[0]])
                                                        != (2, 3)):
            raise UnsupportedLayerError(f"value {name!r}: its shape {full} at batch 2 merges "
                                        "the batch with other dimensions")
        axis = diff[0] if diff else None
        shape = full[:axis] + full[axis + 1:] if axis is not None else full
        infos[name] = ValueInfo(name, program.values[name].dtype, shape, axis, full)
    return infos


def index_tensor(info: ValueInfo, batch: int = 2) -> torch.Tensor:
    """The batched tensor of ``info`` whose elements are their own per-sample offsets plus
    ``sample * BIG`` (no tag for a value without a batch axis)."""
    base = torch.arange(info.numel, dtype=torch.int64).reshape(info.shape)
    if info.batch_axis is None:
        return base
    return torch.stack([base + s * BIG for s in range(batch)], dim=info.batch_axis)


def sample_gather(out: torch.Tensor, info: ValueInfo, source_batched: bool,
                  what: str) -> torch.Tensor:
    """From an index tensor ``out`` (shaped like value ``info`` at batch 2): the flat input
    offset each element of one sample reads (int64 ``[numel]``). Raises UnsupportedLayerError
    when samples would mix."""
    if info.batch_axis is None:
        if source_batched:
            raise UnsupportedLayerError(f"{what}: drops the batch axis (mixes samples)")
        return out.reshape(-1)
    first, second = out.select(info.batch_axis, 0), out.select(info.batch_axis, 1)
    shift = BIG if source_batched else 0
    if not torch.equal(second, first + shift) or bool((first >= BIG).any()):
        raise UnsupportedLayerError(f"{what}: reads across samples of the batch")
    return first.reshape(-1)


def op_gather(program: Program, op: Op, infos: dict[str, ValueInfo]) -> torch.Tensor:
    """The per-sample gather map of a one-input shape op (reshape, transpose, index, ...),
    found by running the reference op on an index tensor."""
    src = infos[op.inputs[0]]
    env = {name: torch.zeros(info.full, dtype=torch.int64) for name, info in infos.items()
           if name not in op.outputs}
    env[op.inputs[0]] = index_tensor(src)
    out = reference._step(program, op, env)[0]    # the specification's own semantics
    return sample_gather(out, infos[op.outputs[0]], src.batched,
                         f"{op.kind} {op.source or op.outputs[0]!r}")


@dataclass(frozen=True)
class Strided:
    """``out[i_0, ..., i_k] = in[offset + sum_j i_j * strides[j]]`` (dims merged where
    contiguous; no dim of size 1)."""

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def identity(self) -> bool:
        return self.offset == 0 and len(self.shape) <= 1 and self.strides in ((), (1,))


def strided(gather: torch.Tensor, shape: Sequence[int]) -> Strided | None:
    """``gather`` (flat offsets over per-sample ``shape``) as an affine map, else None."""
    n = math.prod(shape)
    if n == 0:
        return Strided(0, (), ())
    t = gather.reshape(tuple(shape))
    offset = int(t.reshape(-1)[0])
    dims: list[tuple[int, int]] = []
    recon = torch.full(tuple(shape), offset, dtype=torch.int64)
    for d, size in enumerate(shape):
        if size == 1:
            continue
        at = [0] * len(shape)
        at[d] = 1
        step = int(t[tuple(at)]) - offset
        view = [1] * len(shape)
        view[d] = size
        recon = recon + torch.arange(size, dtype=torch.int64).reshape(view) * step
        dims.append((size, step))
    if not torch.equal(recon, t):
        return None
    merged: list[tuple[int, int]] = []
    for size, step in dims:
        if merged and merged[-1][1] == step * size:
            merged[-1] = (merged[-1][0] * size, step)
        else:
            merged.append((size, step))
    return Strided(offset, tuple(s for s, _ in merged), tuple(st for _, st in merged))


@dataclass
class Block:
    """One buffer of the arena: ``size`` bytes live from op ``start`` to op ``end``
    (inclusive); :func:`plan_arena` fills ``offset``."""

    key: str
    size: int
    start: int
    end: int
    offset: int = -1


def plan_arena(blocks: list[Block], align: int = 64) -> int:
    """Assign each block the lowest aligned offset free of every block live at the same
    time (first fit, larger blocks first among those born together); returns the bytes up
    to the end of the highest block (the arena's base must be ``align``-aligned)."""
    placed: list[Block] = []
    total = 0
    for blk in sorted(blocks, key=lambda b: (b.start, -b.size, b.key)):
        busy = sorted((b.offset, b.offset + b.size) for b in placed
                      if b.start <= blk.end and blk.start <= b.end)
        at = 0
        for lo, hi in busy:
            if at + blk.size <= lo:
                break
            at = max(at, -(-hi // align) * align)
        blk.offset = at
        placed.append(blk)
        total = max(total, at + blk.size)
    return total


def pad_k(k: int) -> int:
    """The dot-product length weights are zero-padded to (groups of 4 bytes: VNNI)."""
    return -(-k // 4) * 4


def pack_weights(w2: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, int, int]:
    """``w2`` ``[O, K]`` in the dot-product kernel's layout, per group: ``[cols16 / 16][kp /
    4][16][4]``, zero-padded (``nnc_gemm`` in ``c/int8_ops.h``); returns it flat, ``kp`` and
    ``cols16`` (per group)."""
    o, k = w2.shape
    og, kp = o // groups, pad_k(k)
    c16 = -(-og // 16) * 16
    out = torch.zeros(groups, c16, kp, dtype=torch.int64)
    out[:, :og, :k] = w2.to(torch.int64).reshape(groups, og, k)
    packed = out.reshape(groups, c16 // 16, 16, kp // 4, 4).permute(0, 1, 3, 2, 4)
    return packed.reshape(-1), kp, c16
