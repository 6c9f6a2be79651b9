"""Model inputs of any form: one tensor, a tuple of tensors, or a dict of tensors.

A batch ``x`` of a :class:`~nncompress.data.Dataset` is what the model is called with:

- a tensor of any dtype (float32 features, int64 token ids, ...): ``model(x)``;
- a tuple or list of tensors (e.g. ids and an attention mask): ``model(*x)``;
- a dict of tensors (keyword inputs, as Hugging Face tokenizers give them): ``model(**x)``.

Every tensor of one batch has the batch as its first dimension. Everything that runs a
model (training, evaluation, MAC counting, latency, tracing, calibration) goes through
:func:`call` and slices batches with :func:`take` / :func:`select`, so no technique
assumes a single float32 tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from nncompress.errors import DataError

__all__ = [
    "Inputs",
    "batch_size",
    "call",
    "check",
    "concat",
    "describe",
    "leaves",
    "map_tensors",
    "observe",
    "packed",
    "repeat_to",
    "select",
    "take",
    "to",
]

#: One batch of model inputs.
Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor],  # noqa: UP007
               Mapping[str, torch.Tensor]]


def leaves(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x`` in order (dict values in key order)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def map_tensors(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``x`` with ``fn`` applied to every tensor, same structure."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return tuple(fn(v) for v in x)


def check(x: Any, what: str = "inputs") -> Inputs:
    """``x`` if it is a tensor, or a non-empty tuple/list/dict of tensors that share their
    first (batch) dimension; DataError naming ``what`` otherwise."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 1:
            raise DataError(f"{what} must have a batch dimension, got a scalar tensor")
        return x
    if isinstance(x, Mapping):
        if not x or not all(isinstance(k, str) for k in x):
            raise DataError(f"{what}: a dict of inputs needs string keys and at least one "
                            "tensor")
    elif not isinstance(x, (tuple, list)) or not x:
        raise DataError(f"{what} must be a tensor, or a tuple/list/dict of tensors, got "
                        f"{type(x).__name__}")
    parts = leaves(x)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in parts):
        raise DataError(f"{what}: every input must be a tensor with a batch dimension, got "
                        f"{', '.join(type(t).__name__ for t in parts)}")
    sizes = {int(t.shape[0]) for t in parts}
    if len(sizes) != 1:
        raise DataError(f"{what}: the inputs disagree on the batch size: "
                        f"{describe(x)}")
    return x


def call(model: nn.Module | Callable[..., Any], x: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the form of ``x``."""
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(*x)


def observe(model: nn.Module, batches: Iterable[Inputs],
            handles: Sequence[torch.utils.hooks.RemovableHandle]) -> None:
    """Run ``model`` on each batch in eval mode without autograd, for the hooks whose
    ``handles`` are given; the hooks are removed and the model's train flag restored
    afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                call(model, x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def packed(args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]) -> Inputs:
    """The inverse of :func:`call`: a forward's ``*args`` / ``**kwargs`` as one Inputs."""
    if args and kwargs:
        raise DataError("inputs given both by position and by keyword; use one form")
    if kwargs:
        return dict(kwargs)
    if len(args) == 1:
        return args[0]
    return tuple(args)


def batch_size(x: Inputs) -> int:
    """Samples in the batch (first dimension of the first tensor)."""
    return int(leaves(x)[0].shape[0])


def select(x: Inputs, index: slice | torch.Tensor | Sequence[int]) -> Inputs:
    """Samples ``index`` (a slice, int64 indices or a bool mask) of every tensor."""
    return map_tensors(x, lambda t: t[index])


def take(x: Inputs, count: int) -> Inputs:
    """The first ``count`` samples."""
    return select(x, slice(0, count))


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Batches joined along the batch dimension (all of the same form)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))  # type: ignore[index]


def repeat_to(x: Inputs, count: int) -> Inputs:
    """Exactly ``count`` samples: the batch repeated as often as needed, then cut."""
    have = batch_size(x)
    if have >= count:
        return take(x, count)
    reps = -(-count // have)
    return take(map_tensors(x, lambda t: t.repeat(reps, *([1] * (t.dim() - 1)))), count)


def to(x: Inputs, device: torch.device | str) -> Inputs:
    """Every tensor moved to ``device``."""
    return map_tensors(x, lambda t: t.to(device))


def describe(x: Inputs) -> str:
    """``float32[2, 1, 40]`` or ``int64[2, 16], bool[2, 16]`` (dict: ``ids=int64[2, 16]``)."""
    def one(t: torch.Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"

    if isinstance(x, torch.Tensor):
        return one(x)
    if isinstance(x, Mapping):
        return ", ".join(f"{k}={one(v)}" for k, v in x.items())
    return ", ".join(one(t) for t in x)
