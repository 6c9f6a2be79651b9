"""What loading a file may cost: the ``max_bytes`` budget and the guard on construction.

A ``.nnc`` file is hostile until checked, and a few bytes can declare gigabytes: a
tensor of 2**30 zeros, a layer of huge widths, a hashed layer whose index buffers take 9
bytes per virtual weight, a recurrent layer of 20,000 layers. ``load`` therefore

- refuses a tensor that declares more elements than its bytes can describe
  (:meth:`~nncompress.formats.Encoding.max_numel`);
- adds up every byte it will allocate -- the decoded tensors, and the parameters and
  buffers of the modules it builds, measured on the meta device first -- and refuses the
  file when the sum passes :class:`Budget`'s limit (``max_bytes``, by default
  ``max(64 MiB, 1024 x file size)``);
- builds on the meta device under :class:`CallGuard`, which stops a construction that
  calls torch more often than the file's tensors could need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nncompress.formats._checks import check_int, fail

__all__ = ["DEFAULT_FLOOR", "DEFAULT_RATIO", "Budget", "CallGuard", "TooMuchWork",
           "call_limit", "default_max_bytes", "meta_tensors", "module_bytes"]

#: The default budget is at least this many bytes ...
DEFAULT_FLOOR = 64 * 2**20
#: ... and otherwise this many times the file's size.
DEFAULT_RATIO = 1024


def default_max_bytes(file_bytes: int) -> int:
    """``max(64 MiB, 1024 x file_bytes)``: what loading a file may allocate by default."""
    return max(DEFAULT_FLOOR, DEFAULT_RATIO * file_bytes)


class Budget:
    """Bytes a load may still allocate; :meth:`spend` refuses what would pass the limit."""

    def __init__(self, max_bytes: int | None, file_bytes: int, source: str) -> None:
        if max_bytes is None:
            self.limit, self.default = default_max_bytes(file_bytes), True
        else:
            self.limit = check_int(max_bytes, "max_bytes", lo=0, hi=2**62)
            self.default = False
        self.spent, self.source = 0, source

    @property
    def left(self) -> int:
        return self.limit - self.spent

    def spend(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more for ``what``; FormatError if the total passes the limit."""
        if self.spent + nbytes > self.limit:
            how = ("the default max(64 MiB, 1024 x file size)" if self.default
                   else "as passed")
            fail(f"loading {self.source} would allocate {self.spent + nbytes:,} bytes "
                 f"({what}: {nbytes:,}), more than max_bytes={self.limit:,} ({how}); "
                 "pass a larger max_bytes= to load it")
        self.spent += nbytes


class TooMuchWork(Exception):
    """Raised inside a guarded construction that made too many torch calls."""


#: In-place initialisers that do nothing on a meta tensor but may take seconds to reach
#: that conclusion (``normal_`` on the meta device imports torch's decompositions).
_META_NOOPS = frozenset({
    "normal_", "uniform_", "fill_", "zero_", "random_", "bernoulli_", "exponential_",
    "log_normal_", "cauchy_", "geometric_", "trunc_normal_", "kaiming_uniform_",
    "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "constant_",
    "ones_", "zeros_", "eye_", "dirac_", "sparse_",
})


#: Elementwise operators whose result on meta tensors follows from broadcasting and type
#: promotion alone; the first of them on the meta device costs torch about a second
#: (it imports its Python decompositions), so they are answered here (hash buffers of a
#: hashed layer are built from a dozen such operations).
_META_ELEMENTWISE = frozenset({
    *(f"__{prefix}{op}__" for op in ("add", "sub", "mul", "mod", "and", "or", "xor",
                                     "floordiv", "lshift", "rshift") for prefix in ("", "r")),
    "add", "sub", "mul", "remainder", "bitwise_and", "bitwise_or", "bitwise_xor"})


def _meta_result(name: str, args: tuple) -> torch.Tensor | None:
    """The meta result of an elementwise operator on meta tensors, or of ``arange`` of
    integers (the guard only runs constructions on the meta device); None otherwise."""
    if name == "arange" and args and all(type(a) is int for a in args):
        return torch.empty(len(range(*args)), dtype=torch.int64, device="meta")
    if name not in _META_ELEMENTWISE or len(args) != 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not all(t.is_meta for t in tensors) or not all(
            isinstance(a, (torch.Tensor, int, float, bool)) for a in args):
        return None
    shapes = [tuple(t.shape) for t in tensors]
    size = max(len(s) for s in shapes)
    padded = [(1,) * (size - len(s)) + s for s in shapes]
    if any(len({d for d in dims if d != 1}) > 1 for dims in zip(*padded, strict=True)):
        return None  # not broadcastable: let torch say so
    shape = tuple(max(dims) if 0 not in dims else 0 for dims in zip(*padded, strict=True))
    return torch.empty(shape, dtype=torch.result_type(*args), device="meta")


class CallGuard(TorchFunctionMode):
    """Counts torch calls during a construction on the meta device; past ``limit``
    raises TooMuchWork (a hostile record asking for thousands of layers stops within
    milliseconds). Initialisers of meta tensors are skipped (they compute nothing), and
    elementwise operators on them and integer ``arange`` answered from shapes and dtypes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        if self.calls > self.limit:
            raise TooMuchWork(f"more than {self.limit} torch calls")
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if name in _META_NOOPS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        plain = not kwargs or (set(kwargs) <= {"dtype", "device"} and name == "arange"
                               and kwargs.get("dtype", torch.int64) == torch.int64
                               and kwargs.get("device") in (None, "meta"))
        result = _meta_result(name, args) if plain else None
        return func(*args, **kwargs) if result is None else result


def call_limit(tensors: int) -> int:
    """Torch calls a construction owning ``tensors`` tensors may make (the reference
    models make about 4 a tensor; this allows 8 times that, and 1024 more)."""
    return 1024 + 32 * tensors


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (non-persistent ones too; meta
    tensors count what they would take)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter, buffer or tensor attribute of ``module`` is on the meta
    device (lists and tuples of tensors included)."""
    for sub in module.modules():
        for value in (*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values()):
            items = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in items):
                return True
    return False
