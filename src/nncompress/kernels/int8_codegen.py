"""Generate one C99 translation unit that runs an integer program (Jacob et al., 2018).

:func:`generate_c` specialises the engine to one :class:`~nncompress.quant.program.Program`
and one per-sample input shape: constants become ``static const`` arrays (int8 weights laid
out for contiguous dot products, int64 biases with the input zero-point folded in, int32
fixed-point multipliers and shifts, lookup tables), every intermediate value gets a fixed
offset in one arena (buffers of dead values reused), and the entry point runs the ops over
the batch in blocks of ``block`` samples::

    int nnc_run(const void *input, float *output, int32_t batch, uint8_t *arena);

(with several inputs or outputs: ``input0, input1, ..., output0, ...``), returning 0, or 1
when an embedding id is out of range. ``arena`` holds ``info.arena_bytes`` bytes, 64-byte
aligned. The source includes only ``<stdint.h>`` and ``<string.h>`` (``<math.h>`` when the
program has ``float`` ops) and compiles with ``gcc -std=c99 -Wall -Wextra -Werror``. The
kernels are ``kernels/c/int8_ops.h`` (pasted in; ``int8_float.h`` and ``int8_rnn.h`` too
when the program has float or recurrent ops); each op kind's emitter is in
:mod:`nncompress.kernels.int8_emit` (one table, :data:`~nncompress.kernels.int8_emit.EMITTERS`).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nncompress.errors import UnsupportedLayerError
from nncompress.kernels.int8_layout import Block, ValueInfo, infer_values, plan_arena
from nncompress.quant.program import Op, Program

__all__ = ["CInfo", "Gen", "c_float", "generate_c"]

_C_DIR = Path(__file__).resolve().parent / "c"
_TOKEN = re.compile(r"\$([A-Za-z0-9_:.]+)\$")
_ALIGN = 64
_SIZES = {"int8_t": 1, "uint8_t": 1, "int16_t": 2, "int32_t": 4, "float": 4, "int64_t": 8,
          "double": 8}
#: kernel headers pasted after int8_ops.h when an emitter asks for them, in this order
_HEADERS = ("int8_float.h", "int8_rnn.h", "int8_compact.h")


@dataclass(frozen=True)
class CInfo:
    """What :func:`generate_c` built: the entry point's name, the arena's bytes (``block``
    samples at a time), the bytes of the constant arrays, and per input / output its value
    name, dtype and per-sample shape. The C function reads and writes every tensor batch
    first; ``output_axes`` says where the program puts each output's batch axis (``None``:
    an output that does not depend on the batch, written once per sample)."""

    entry: str
    arena_bytes: int
    block: int
    const_bytes: int
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    float_ops: int
    output_axes: tuple[int | None, ...] = ()


def c_float(value: float) -> str:
    """``value`` rounded to float32, as an exact C hex literal."""
    f = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    if not math.isfinite(f):
        raise UnsupportedLayerError(f"a float constant is not finite: {value}")
    return f"{f.hex()}f" if f != 0 else "0.0f"


def _c_int(v: int) -> str:
    return f"{v}LL" if not -(2**31) < v < 2**31 else str(v)


class Gen:
    """The state of one generation: consts, arena buffers, the C lines of the block loop.

    Emitters call :meth:`out` / :meth:`alias` / :meth:`bind` for the op's output values,
    :meth:`scratch` for temporary buffers, :meth:`const` for arrays, :meth:`ptr` / :meth:`at`
    for pointers and :meth:`emit` for C lines.
    """

    def __init__(self, program: Program, infos: dict[str, ValueInfo], block: int,
                 compact: bool = False) -> None:
        self.p, self.infos, self.block = program, infos, block
        self.compact = compact                   # the smallest consts (the C export)
        self.decls: list[str] = []
        self.body: list[str] = []                # the C lines of the op being emitted
        self.funcs: list[tuple[str, list[str]]] = []   # (comment, lines) of each op
        self.base: dict[str, str] = {}           # value -> C pointer to its block's storage
        self.storage: dict[str, str] = {}        # value -> arena block key
        self.blocks: dict[str, Block] = {}
        self.index = 0                           # the op being emitted
        self.const_bytes = 0
        self.headers: set[str] = set()           # extra kernel headers (float ops, RNNs)

    # storage ---------------------------------------------------------------------------
    def _arena(self, key: str, ctype: str, count: int) -> str:
        size = count * _SIZES[ctype]
        self.blocks[key] = Block(key, size, self.index, self.index)
        return f"(({ctype} *)(arena + ${key}$))"

    def out(self, value: str) -> str:
        """Give value ``value`` (an output of this op) its own arena buffer."""
        info = self.infos[value]
        key = f"v:{value}"
        count = info.numel * (self.block if info.batched else 1)
        self.base[value] = self._arena(key, info.ctype, count)
        self.storage[value] = key
        return self.base[value]

    def alias(self, value: str, source: str) -> None:
        """``value`` shares ``source``'s storage (same per-sample order)."""
        self.base[value] = self.base[source]
        if source in self.storage:
            self.storage[value] = self.storage[source]

    def bind(self, value: str, pointer: str) -> None:
        """``value`` lives outside the arena (an input or a constant)."""
        self.base[value] = pointer

    def scratch(self, ctype: str, count: int) -> str:
        """A temporary buffer of ``count`` ``ctype`` live during this op only."""
        return self._arena(f"t{self.index}_{len(self.blocks)}", ctype, max(count, 1))

    # pointers --------------------------------------------------------------------------
    def ptr(self, value: str) -> str:
        return self.base[value]

    def at(self, value: str, sample: str = "s") -> str:
        """Pointer to sample ``sample`` of ``value`` (the block base when unbatched)."""
        info = self.infos[value]
        if not info.batched:
            return self.base[value]
        return f"({self.base[value]} + (size_t)({sample}) * {info.numel})"

    def count(self, value: str, per_sample: int | None = None) -> str:
        """``per_sample`` (default: the value's elements) times the block's samples."""
        n = self.infos[value].numel if per_sample is None else per_sample
        return f"nb * {n}" if self.infos[value].batched else str(n)

    def samples(self, value: str) -> str:
        return "nb" if self.infos[value].batched else "1"

    # code ------------------------------------------------------------------------------
    def emit(self, *lines: str) -> None:
        self.body.extend(lines)

    def per_sample(self, value: str, lines: Sequence[str]) -> None:
        """``lines`` once per sample ``s`` of the block (once if ``value`` is unbatched)."""
        self.emit(f"for (int32_t s = 0; s < {self.samples(value)}; s++) {{",
                  *(f"    {ln}" for ln in lines), "}")

    def const(self, hint: str, ctype: str, values: torch.Tensor | Sequence) -> str:
        """A ``static const`` array of ``values`` (flattened); returns its C name."""
        flat = torch.as_tensor(values).reshape(-1)
        name = f"k{len(self.decls)}_{re.sub(r'[^a-z0-9]', '', hint.lower())[:12]}"
        if ctype == "float":
            items = [c_float(v) for v in flat.tolist()]
        elif ctype == "double":
            items = [float(v).hex() for v in flat.double().tolist()]
        else:
            items = [_c_int(int(v)) for v in flat.tolist()]
        items = items or ["0"]
        rows = [", ".join(items[i:i + 24]) for i in range(0, len(items), 24)]
        self.decls.append(f"static const {ctype} NNC_ALIGNED {name}[{len(items)}] = {{\n    "
                          + ",\n    ".join(rows) + "\n};")
        self.const_bytes += len(items) * _SIZES[ctype]
        return name


def _finish(gen: Gen) -> tuple[int, dict[str, int]]:
    """Lifetimes of the arena buffers and their offsets; the arena's bytes."""
    last = {name: i for i, op in enumerate(gen.p.ops) for name in op.inputs}
    for name in gen.p.outputs:
        last[name] = len(gen.p.ops)
    for value, key in gen.storage.items():
        if value in last:
            gen.blocks[key].end = max(gen.blocks[key].end, last[value])
    total = plan_arena(list(gen.blocks.values()), _ALIGN)
    return total, {k: b.offset for k, b in gen.blocks.items()}


def _signature(entry: str, n_in: int, n_out: int) -> str:
    ins = ["const void *input"] if n_in == 1 else [f"const void *input{k}" for k in range(n_in)]
    outs = ["float *output"] if n_out == 1 else [f"float *output{k}" for k in range(n_out)]
    return f"int {entry}({', '.join(ins + outs)}, int32_t batch, uint8_t *arena)"


def _params(gen: Gen) -> tuple[str, str]:
    """The parameter list and the argument list of every op function."""
    types = [gen.infos[name].ctype for name in gen.p.inputs]
    params = ", ".join(["int32_t nb", "uint8_t *arena"]
                       + [f"const {t} *in{k}" for k, t in enumerate(types)])
    return params, ", ".join(["nb", "arena"] + [f"in{k}" for k in range(len(types))])


def _functions(gen: Gen) -> list[str]:
    """One static function per op that computes anything (each optimised on its own, which
    keeps gcc's time linear in the program)."""
    params, _ = _params(gen)
    unused = " ".join(f"(void){p.split()[-1].lstrip('*')};" for p in params.split(", "))
    lines: list[str] = []
    for k, (note, body) in enumerate(gen.funcs):
        if body:
            lines += [f"/* {note} */", f"static NNC_NOINLINE int nnc_op{k}({params}) {{",
                      f"    {unused}", *(f"    {ln}" for ln in body), "    return 0;", "}", ""]
    return lines


def _entry(gen: Gen, entry: str, arena_bytes: int) -> list[str]:
    p, infos = gen.p, gen.infos
    ins = ["input"] if len(p.inputs) == 1 else [f"input{k}" for k in range(len(p.inputs))]
    outs = ["output"] if len(p.outputs) == 1 else [f"output{k}" for k in range(len(p.outputs))]
    lines = [_signature(entry, len(ins), len(outs)) + " {", "    int32_t b0;",
             "    if (batch < 0) return 2;", "    (void)arena;",
             f"    for (b0 = 0; b0 < batch; b0 += {gen.block}) {{",
             f"        const int32_t nb = batch - b0 < {gen.block} ? batch - b0 : {gen.block};",
             "        (void)nb;"]
    for k, name in enumerate(p.inputs):
        info = infos[name]
        lines += [f"        const {info.ctype} *in{k} = (const {info.ctype} *){ins[k]} + "
                  f"(size_t)b0 * {info.numel};", f"        (void)in{k};"]
    _, args = _params(gen)
    lines += [f"        if (nnc_op{k}({args})) return 1;"
              for k, (_, body) in enumerate(gen.funcs) if body]
    for k, name in enumerate(p.outputs):
        info = infos[name]
        dst = f"{outs[k]} + (size_t)b0 * {info.numel}"
        if info.batched:
            lines.append(f"        memcpy({dst}, {gen.ptr(name)}, (size_t)nb * {info.numel} "
                         "* sizeof(float));")
        else:
            lines.append(f"        for (int32_t s = 0; s < nb; s++) memcpy({dst} + (size_t)s * "
                         f"{info.numel}, {gen.ptr(name)}, {info.numel} * sizeof(float));")
    lines += ["    }", "    return 0;", "}", "",
              f"int64_t {entry.removesuffix('_run')}_arena_bytes(void) {{ return {arena_bytes}; }}"]
    return lines


def _check_io(program: Program, infos: dict[str, ValueInfo]) -> None:
    for name in program.inputs:
        if infos[name].dtype not in ("float32", "int64"):
            raise UnsupportedLayerError(f"input {name!r}: dtype {infos[name].dtype} (the engine "
                                        "takes float32 or int64 ids)")
    for name in program.outputs:
        if infos[name].dtype != "float32":
            raise UnsupportedLayerError(f"output {name!r}: dtype {infos[name].dtype} (the engine "
                                        "returns float32; end the program with dequantize)")


def _emit_op(gen: Gen, op: Op) -> None:
    from nncompress.kernels.int8_emit import EMITTERS
    emitter = EMITTERS.get(op.kind)
    if emitter is None:
        raise UnsupportedLayerError(f"op {op.kind!r} ({op.source or op.outputs[0]}): no C "
                                    "kernel for this kind")
    note = f"{op.kind} {op.source} -> {', '.join(op.outputs)}".replace("*/", "* /")
    gen.body = []
    emitter(gen, op)
    gen.funcs.append((note, gen.body))


def generate_c(program: Program, sample_shapes: Sequence[Sequence[int]], *, block: int = 8,
               prefix: str = "nnc", compact: bool = False) -> tuple[str, str, CInfo]:
    """The C source, its header and a :class:`CInfo` for ``program`` on inputs shaped
    ``[batch, *sample_shapes[k]]``; ``block`` samples share one pass over the weights
    (1 for the smallest arena, e.g. on a microcontroller). ``compact``: Linear weights
    unpadded with int32 biases and 16-bit multipliers, dequantization computed instead of
    tabled (``c/int8_compact.h``: the least flash, for the C export). Raises
    UnsupportedLayerError naming an op the engine cannot run."""
    if block < 1 or not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", prefix):
        raise ValueError(f"block must be >= 1 and prefix a C identifier, got {block}, {prefix!r}")
    infos = infer_values(program, sample_shapes)
    _check_io(program, infos)
    gen = Gen(program, infos, block, compact)
    for k, name in enumerate(program.inputs):
        gen.bind(name, f"in{k}")
    for index, op in enumerate(program.ops):
        gen.index = index
        _emit_op(gen, op)
    arena, offsets = _finish(gen)
    entry = f"{prefix}_run"
    info = CInfo(entry, arena, block, gen.const_bytes,
                 tuple((n, infos[n].dtype, infos[n].shape) for n in program.inputs),
                 tuple((n, infos[n].dtype, infos[n].shape) for n in program.outputs),
                 len(program.float_ops()),
                 tuple(infos[n].batch_axis for n in program.outputs))
    parts = ["/* Generated by nncompress (kernels/int8_codegen.py): an integer-only int8 "
             "program,", " * Jacob et al. (2018). Do not edit. */",
             (_C_DIR / "int8_ops.h").read_text()]
    parts += [(_C_DIR / h).read_text() for h in _HEADERS if h in gen.headers]
    code = [_TOKEN.sub(lambda m: str(offsets[m.group(1)]), ln)
            for ln in _functions(gen) + _entry(gen, entry, arena)]
    parts += [*gen.decls, "", *code]
    return "\n".join(parts) + "\n", _header(info, prefix), info


def _header(info: CInfo, prefix: str) -> str:
    up = prefix.upper()
    lines = [f"/* {prefix}: generated by nncompress; see the .c file. */",
             f"#ifndef {up}_MODEL_H", f"#define {up}_MODEL_H", "#include <stdint.h>",
             f"#define {up}_ARENA_BYTES {info.arena_bytes}", f"#define {up}_ARENA_ALIGN {_ALIGN}",
             f"#define {up}_BLOCK {info.block}"]
    for k, (name, dtype, shape) in enumerate(info.inputs):
        lines.append(f"#define {up}_INPUT{k}_NUMEL {math.prod(shape)}  /* {name}: {dtype} "
                     f"{list(shape)} per sample */")
    for k, (name, _, shape) in enumerate(info.outputs):
        lines.append(f"#define {up}_OUTPUT{k}_NUMEL {math.prod(shape)}  /* {name}: float32 "
                     f"{list(shape)} per sample */")
    lines += [_signature(info.entry, len(info.inputs), len(info.outputs)) + ";",
              f"int64_t {prefix}_arena_bytes(void);", f"#endif /* {up}_MODEL_H */"]
    return "\n".join(lines) + "\n"
