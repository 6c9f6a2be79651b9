"""The int8 model a user gets back, and the post-training ``quantize_int8`` technique.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018), "Quantization and
training of neural networks for efficient integer-arithmetic-only inference": BatchNorm
folded first, weights int8 symmetric per output channel, activations int8 affine with
zero-points calibrated on a few batches (``minmax``, ``percentile``, ``mse`` or ``kl``),
int32 accumulation and fixed-point requantization (:mod:`nncompress.quant.affine`).

:class:`Int8Model` holds an integer :class:`~nncompress.quant.program.Program`: its
constants are the module's buffers (int8 weights on disk), its structure one JSON string
(the architecture record ``"int8"``). ``forward`` runs the program in the generated-C
engine (:mod:`nncompress.kernels.int8`, compiled once per input shape with the machine's
gcc) and falls back to the integer reference (:mod:`nncompress.quant.reference`) when no
compiler is available or while gradients are needed; both give the same integers.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import zlib
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from nncompress import inputs
from nncompress.errors import KernelUnavailableError, UnsupportedLayerError
from nncompress.models.base import ARCHITECTURES, ArchModule
from nncompress.quant import reference
from nncompress.quant.convert import convert
from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
from nncompress.quant.program import Program
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["Int8Model", "QuantizeInt8Config", "quantize_int8", "to_int8"]

#: why the C engine may not run a program: no compiler, or an op it has no kernel for
_NO_ENGINE = (KernelUnavailableError, UnsupportedLayerError, ImportError)
_STORED = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
           "float32": torch.float32, "m16": torch.int16, "f16": torch.float16}
_MAX_RECORD = 64 * 2**20


def _pack(record: dict[str, Any]) -> str:
    text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def _unpack(blob: Any) -> Any:
    """The record from :func:`_pack`'s text; at most 64 MiB inflated (FormatError)."""
    from nncompress.formats._checks import fail
    if not isinstance(blob, str) or len(blob) > _MAX_RECORD:
        fail("int8 record must be a base64 string of at most 64 MiB")
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, _MAX_RECORD)
        if inflater.unconsumed_tail or not inflater.eof:
            fail("int8 record is truncated or inflates past 64 MiB")
        return json.loads(text)
    except (ValueError, zlib.error, UnicodeError) as exc:
        fail(f"int8 record is not valid compressed JSON: {str(exc)[:80]}")


class Int8Model(ArchModule):
    """An integer program as a module: ``forward(*inputs)`` -> float32 output(s).

    Buffers ``c0, c1, ...`` are the program's constants in the order of the record's
    ``consts`` list (``[name, dtype, shape]``; dtype ``"m16"``: an int32 multiplier whose
    low 16 bits are zero, stored as its int16 high half; ``"f16"``: a float32 tensor whose
    values are exact in float16, stored as float16). ``blob`` is the record -- the
    program's JSON (see :meth:`Program.to_json`) and that list -- zlib-compressed and
    base64-encoded (the structure of a transformer is 12 KB of JSON); it is validated on
    construction, so a hostile file fails with a one-line FormatError.
    """

    arch_name = "int8"

    def __init__(self, blob: str, tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        from nncompress.formats._checks import (
            MAX_ELEMENTS,
            check_int,
            check_keys,
            check_list,
            check_str,
            fail,
        )
        record = check_keys(_unpack(blob), "int8 record", ("program", "consts"))
        self._names: list[str] = []
        self._wide: list[bool] = []
        self._specs: list[tuple[torch.dtype, tuple[int, ...]]] = []   # as the record says
        elements = 0
        for i, spec in enumerate(check_list(record["consts"], "int8 consts",
                                            max_len=1_000_000)):
            items = check_list(spec, f"int8 const {i}", max_len=3)
            if len(items) != 3:
                fail(f"int8 const {i} must be [name, dtype, shape]")
            name, dtype = check_str(items[0], "int8 const name"), items[1]
            if dtype not in _STORED:
                fail(f"int8 const {name!r} has dtype {dtype!r}; allowed: {', '.join(_STORED)}")
            shape = [check_int(d, f"int8 const {name!r} shape", hi=2**31)
                     for d in check_list(items[2], "shape", max_len=8)]
            elements += math.prod(shape)
            if elements > MAX_ELEMENTS:    # before torch.zeros allocates (or overflows)
                fail(f"int8 consts declare more than {MAX_ELEMENTS} elements (at {name!r})")
            self._specs.append((_STORED[dtype], tuple(shape)))
            self._names.append(name)
            given = (tensors or {}).get(name)
            if given is not None:
                self._check_const(i, given)
            self.register_buffer(f"c{i}", given if given is not None
                                 else torch.zeros(shape, dtype=_STORED[dtype]))
            self._wide.append(dtype in ("m16", "f16"))
        self.blob = blob
        self.program = Program.from_json(check_str(record["program"], "int8 program"),
                                         self._consts())
        self._engines: dict[Any, Any] = {}   # compiled engines per input shapes (a cache)
        for i in _weight_indices(self.program, self._names):
            tensor = self._buffers.pop(f"c{i}")
            self.register_parameter(f"c{i}", nn.Parameter(tensor, requires_grad=False))

    @classmethod
    def from_program(cls, program: Program) -> Int8Model:
        specs, tensors = [], {}
        for name, t in program.consts.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if t.dtype == torch.int32 and t.numel() and bool(((t & 0xFFFF) == 0).all()) \
                    and bool((t >= 0).all()) and int(t.max()) < 2**31:
                t, dtype = (t >> 16).to(torch.int16), "m16"
            elif t.dtype == torch.float32 and t.numel() and torch.equal(t.half().float(), t):
                t, dtype = t.half(), "f16"   # exactly representable: stored in half
            specs.append([name, dtype, list(t.shape)])
            tensors[name] = t
        blob = _pack({"program": program.to_json(), "consts": specs})
        return cls(blob, tensors)

    def _consts(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self._names):
            t = getattr(self, f"c{i}")
            t = t.data if isinstance(t, nn.Parameter) else t
            if self._wide[i]:
                t = t.float() if t.dtype == torch.float16 else (t.to(torch.int32) << 16)
            out[name] = t
        return out

    def arch_config(self) -> dict[str, Any]:
        return {"blob": self.blob}

    def macs(self, *args: torch.Tensor) -> tuple[int, int]:
        """Per-sample multiply-accumulates of the program on inputs shaped like ``args``
        (dense, and those whose int8 weight is non-zero), from one reference run on the
        first sample."""
        from nncompress.quant.program_macs import program_macs
        return program_macs(self.current_program(), *(a[:1] for a in args))

    def current_program(self) -> Program:
        """The program over the module's current buffers (after a load or ``.to``)."""
        p = self.program
        return Program(p.inputs, p.outputs, p.values, p.ops, self._consts())

    def engine(self, *args: torch.Tensor) -> Any:
        """The compiled C engine for these inputs' per-sample shapes (compiled on first
        use, then cached); raises KernelUnavailableError without a C compiler (or
        UnsupportedLayerError for an op the engine lacks)."""
        key = _key(args)
        engine = self._engines.get(key)
        if engine is None:
            from nncompress.kernels.int8 import compile_program
            try:
                shapes = [list(a.shape[1:]) for a in args]
                engine = compile_program(self.current_program(), shapes)
            except _NO_ENGINE as exc:
                engine = exc           # remembered: no recompiling on every call
            self._engines[key] = engine
        if isinstance(engine, Exception):
            raise engine
        return engine

    def forward(self, *args: torch.Tensor, **named: torch.Tensor) -> Any:
        """The program's output(s): the C engine when it runs this program (the integer
        arithmetic is not differentiable either way), else the integer reference. Inputs
        given by name (a dict batch) take the program's input order."""
        if named:
            args = (*args, *(named[n] for n in self.program.inputs[len(args):]))
        engine = self._engines.get(_key(args))
        if len(args) == 1 and engine is not None and not isinstance(engine, Exception):
            y = engine.run_single(args[0])
            if y is not None:
                return y
        if engine is None:
            try:
                engine = self.engine(*args)
            except _NO_ENGINE:
                engine = None
        if engine is None or isinstance(engine, Exception):
            outs = reference.run(self.current_program(), *args)
        else:
            outs = engine(*args)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _check_const(self, i: int, tensor: torch.Tensor) -> None:
        """A tensor for const ``i`` has the dtype and shape the (validated) record says."""
        dtype, shape = self._specs[i]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            from nncompress.formats._checks import fail
            fail(f"int8 const {self._names[i]!r} is {tensor.dtype} {list(tensor.shape)}; its "
                 f"record says {dtype} {list(shape)}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        self._engines.clear()   # engines hold the constants they were compiled with
        for i in range(len(self._names)):   # a file's tensors must be what was validated
            tensor = state_dict.get(f"{prefix}c{i}")
            if isinstance(tensor, torch.Tensor):
                self._check_const(i, tensor)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: const roles that are the model's parameters (weights, biases, a positional table)
_PARAM_ROLES = frozenset({"w", "b", "value", "weight", "bias", "w_ih", "w_hh", "b_ih", "b_hh"})


def _weight_indices(program: Program, names: list[str]) -> list[int]:
    """Indices of the consts that are parameters of the model (count_params counts them):
    weights and biases of every layer and embedding tables; not multipliers, shifts or
    lookup tables."""
    chosen: set[str] = set()
    for op in program.ops:
        for role, name in op.consts.items():
            role = role.rsplit(".", 1)[-1]
            if role in _PARAM_ROLES or (op.kind == "embedding" and role == "table"):
                chosen.add(name)
    return [i for i, name in enumerate(names) if name in chosen]


def _key(args: tuple[torch.Tensor, ...]) -> Any:
    """The engine cache key: the per-sample shape(s) of the inputs."""
    return args[0].shape[1:] if len(args) == 1 else tuple(a.shape[1:] for a in args)


ARCHITECTURES.register(Int8Model.arch_name, Int8Model)


class QuantizeInt8Config(TechniqueConfig):
    """``observer``: how activation ranges are calibrated; ``calibration_batches``:
    training batches observed; ``per_channel``: weight scales per output channel (else
    one per tensor); ``percentile``: for the percentile observer."""

    observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    calibration_batches: int = Field(default=8, ge=1, le=10_000)
    per_channel: bool = True
    percentile: float | None = Field(default=None, gt=50.0, le=100.0)


def _batches(ctx: Context, count: int) -> list[inputs.Inputs]:
    """The inputs of the first ``count`` training batches in the loader's order for
    ``ctx.seed`` (the same batches whatever ran before; labels are never read)."""
    from nncompress.train import reseed_loader

    reseed_loader(ctx.data.train, ctx.seed)
    out = []
    for x, *_ in ctx.data.train:
        out.append(x)
        if len(out) >= count:
            break
    return out


def to_int8(model: nn.Module, ctx: Context, *, calibration: Any = None,
            per_channel: bool = True, observer: str = "minmax",
            options: dict[str, Any] | None = None) -> Int8Model:
    """Fold BatchNorm, convert, log what stayed float, compile the engine for the data's
    input shape. ``calibration``: ranges from QAT (else the observers run on training
    batches)."""
    from nncompress.modules import decompose
    from nncompress.quant.convert import build_program, positional_model, trace
    from nncompress.quant.convert_lowbit import int8_forms
    model, notes = decompose(model, ctx.masks)   # PyTorch attention built-ins -> plain layers
    for line in notes:
        ctx.note(line)
    model, lines = int8_forms(model)   # frozen low-bit layers -> int8 codes + scales
    for line in lines:
        ctx.note(line)
    model.eval()
    fold_batchnorm(model, FoldBatchNormConfig(), ctx)
    batches = _batches(ctx, 8 if calibration is not None else
                       (options or {}).pop("calibration_batches", 8))
    if calibration is None:
        program, log = convert(model, batches, observer=observer, per_channel=per_channel,
                               **(options or {}))
    else:
        program, log = build_program(trace(model, positional_model(model, batches[0])),
                                     calibration, per_channel=per_channel)
    for line in log:
        ctx.note(line)
    result = Int8Model.from_program(program)
    kept = [op.source for op in program.float_ops()]
    ctx.note(f"int8: {len(program.ops)} ops, weights {program.weight_bytes():,} B; "
             f"kept in float32: {', '.join(kept) if kept else 'nothing'}")
    try:
        x = batches[0]
        with torch.no_grad():
            result.engine(*(t[:1] for t in positional_model(model, x)))
    except _NO_ENGINE as exc:
        ctx.note(f"int8: the C engine is unavailable ({str(exc)[:120]}); the model runs the "
                 "integer reference (same outputs, slower)")
    return result


def quantize_int8(model: nn.Module, config: QuantizeInt8Config, ctx: Context) -> Int8Model:
    """Post-training integer-only int8 (Jacob et al., 2018); no labels needed."""
    if isinstance(model, Int8Model):
        raise UnsupportedLayerError("quantize_int8: the model is already an int8 model")
    options: dict[str, Any] = {"calibration_batches": config.calibration_batches}
    if config.percentile is not None:
        if config.observer != "percentile":
            raise UnsupportedLayerError("quantize_int8: percentile is an option of the "
                                        "percentile observer only")
        options["percentile"] = config.percentile
    ctx.masks = {}
    # a copy: folding and rewriting must not touch the model handed in before a refusal
    return to_int8(copy.deepcopy(model), ctx, per_channel=config.per_channel,
                   observer=config.observer, options=options)


TECHNIQUES.register("quantize_int8", Technique(
    name="quantize_int8",
    category="bits-precision",
    paper="Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018): "
          "Quantization and training of neural networks for efficient "
          "integer-arithmetic-only inference",
    summary="Post-training integer-only int8: BatchNorm folded, int8 weights per channel, "
            "calibrated int8 activations, int32 accumulation, fixed-point requantization; "
            "runs as generated C.",
    config=QuantizeInt8Config,
    apply=quantize_int8,
))

