"""Sparse inference engine: run pruned Linear and Conv layers straight from CSR.

The idea of EIE (Han, Liu, Mao, Pu, Pedram, Horowitz & Dally, 2016, "EIE: Efficient
Inference Engine on Compressed Deep Neural Network") in software: after pruning (Han et
al., 2015) a layer's weight ``[out, in]`` is stored as compressed sparse rows (row
pointers ``[out + 1]``, column indices ``[nnz]``, values ``[nnz]``) and the forward pass
only touches the non-zeros. :meth:`SparseLinear.reference` computes the same with the
dense masked weight in plain torch; the tests compare the two. Convolutions get the same
treatment through their matrix form (:class:`nncompress.kernels.sparse_conv.SparseConv`:
im2col + CSR product).

Which path is faster depends on the layer, its sparsity and the batch size, so
:func:`sparsify` *measures* it: each Linear / Conv1d / Conv2d whose weight sparsity
reaches ``min_sparsity`` is timed dense and sparse on its real input shape (captured
with a forward hook) at each requested batch size, and swapped for its sparse module only
where the sparse path is faster at all of them. The returned :class:`SparsifyReport`
lists every such layer with both timings and the choice (or why it has no sparse path).

Deployment, not storage: a sparsified model is for inference. Save the dense (pruned)
model with ``nc.save`` and sparsify after loading: ``kernels.sparsify(nc.load(path), x)``.
:meth:`SparseLinear.to_dense` and :func:`densify` convert back; call :func:`densify`
before ``nc.save`` (a file saved with sparse modules in it does not load: ``nc.load``
raises FormatError, the recorded module type differs from the architecture's).

Measured (1 thread, ``bench/sparse_engine.py``, three runs): at batch 1 the CSR path beats
dense only on the larger layer (300x784: 1.07-1.16x at 90 %, 1.4-1.5x at 95 %, 2x at
99 %); on 100x300 or smaller the per-call overhead of the sparse kernel (~8 us) exceeds
the dense gemv (~6 us) and ``sparsify`` keeps it dense. At batch 256 the CSR path wins
from 90 % on the large layer and from 95 % on the small one. The im2col convolution path
was slower than the dense kernel in every case measured (0.4-0.9x).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncompress import inputs
from nncompress.errors import UnsupportedLayerError
from nncompress.inputs import Inputs
from nncompress.kernels._csr import CSRWeight
from nncompress.kernels.sparse_conv import SparseConv, conv_unsupported

__all__ = ["LayerChoice", "SparseLinear", "SparsifyReport", "densify", "sparsify"]


class SparseLinear(CSRWeight):
    """``y = x W^T + b`` with ``W`` ``[out, in]`` held in CSR; ``x`` ``[..., in]``.

    Batch 1 (a single row) uses sparse matrix-vector (``torch.addmv``); larger batches use
    sparse-dense matrix multiply (``torch.sparse.mm`` of ``W [out, in]`` by ``x^T``).
    Buffers ``crow_indices [out + 1]``, ``col_indices [nnz]``, ``values [nnz]`` and an
    optional ``bias [out]`` parameter; inference only (no gradient through ``values``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise UnsupportedLayerError(
                f"SparseLinear needs a 2-d float weight, got shape {tuple(weight.shape)} "
                f"dtype {weight.dtype}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        super().__init__(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The CSR copy of ``linear`` (its zeros are the pruned weights)."""
        return cls(linear.weight, linear.bias)

    def _build(self) -> torch.Tensor:
        # a plain attribute (not a module lookup) for the batch-1 path: the bias, or zeros
        self._shift = (self.bias.detach() if self.bias is not None
                       else self.values.new_zeros(self.out_features))
        return super()._build()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.out_features * self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight ``[out, in]`` (zeros where pruned)."""
        return self.dense_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:  # batch 1: one sparse mat-vec, minimal Python
            return torch.addmv(self._shift, self._csr, x.reshape(-1)).view(1, -1)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            if self.bias is None:
                out = torch.mv(self._csr, rows[0])
            else:
                out = torch.addmv(self.bias, self._csr, rows[0])
            out = out.unsqueeze(0)
        else:
            out = torch.sparse.mm(self._csr, rows.t().contiguous()).t()
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-torch dense computation of the same layer: ``x [..., in] -> [..., out]``."""
        return nn.functional.linear(x, self.dense_weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weights (pruned entries zero)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")


@dataclass(frozen=True)
class LayerChoice:
    """One Linear/Conv layer: weight ``shape``, weight sparsity, median microseconds per
    call dense and sparse at each batch size (same order as ``batch_sizes``), and
    ``choice`` ``"sparse"`` or ``"dense"`` with the reason."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    batch_sizes: tuple[int, ...]
    dense_us: tuple[float, ...]
    sparse_us: tuple[float, ...]
    choice: str
    reason: str


@dataclass(frozen=True)
class SparsifyReport:
    """Every Linear/Conv layer of the model, in module order, measured with ``threads``
    threads."""

    layers: tuple[LayerChoice, ...]
    threads: int

    @property
    def sparse_layers(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.layers if r.choice == "sparse")


@dataclass(frozen=True)
class SparsePath:
    """How a layer type runs sparse: ``build(layer)`` gives the sparse module;
    ``unsupported(layer)`` says why this particular layer cannot (or ``None``)."""

    build: Callable[[nn.Module], nn.Module]
    unsupported: Callable[[nn.Module], str | None]


def _always(_layer: nn.Module) -> None:
    return None


#: layer type -> its sparse path (one table: sparsify, the report and densify read it)
SPARSE_PATHS: dict[type[nn.Module], SparsePath] = {
    nn.Linear: SparsePath(SparseLinear.from_linear, _always),
    nn.Conv1d: SparsePath(SparseConv, conv_unsupported),
    nn.Conv2d: SparsePath(SparseConv, conv_unsupported),
}
_SPARSE_MODULES = (SparseLinear, SparseConv)


def _median_us(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(max(3, repeats // 10)):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e6)
    return float(statistics.median(times))


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in SPARSE_PATHS]


def _capture_inputs(model: nn.Module, example_input: Inputs) -> dict[str, torch.Size]:
    """Per-call input shape of every candidate layer (the first call if one runs twice)."""
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for name, m in _candidates(model):
        def hook(_m: nn.Module, args: tuple[Any, ...], _n: str = name) -> None:
            shapes.setdefault(_n, args[0].shape)
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            inputs.call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _decide(name: str, layer: nn.Module, in_shape: torch.Size | None,
            batch_sizes: tuple[int, ...], min_sparsity: float, repeats: int,
            seed: int) -> tuple[LayerChoice, nn.Module | None]:
    w = layer.weight
    sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
    row = dict(name=name, shape=tuple(int(d) for d in w.shape), sparsity=sparsity,
               batch_sizes=batch_sizes)

    def dense(reason: str) -> tuple[LayerChoice, None]:
        return LayerChoice(**row, dense_us=(), sparse_us=(), choice="dense",
                           reason=reason), None

    if in_shape is None:
        return dense("not called by the example input")
    if sparsity < min_sparsity:
        return dense(f"sparsity {sparsity:.4f} < min_sparsity {min_sparsity}")
    path = SPARSE_PATHS[type(layer)]
    why = path.unsupported(layer)
    if why is not None:
        return dense(f"no sparse path: {why}")
    sparse = path.build(layer)
    gen = torch.Generator().manual_seed(seed)
    dense_us, sparse_us = [], []
    for b in batch_sizes:
        x = torch.randn((b, *in_shape[1:]), generator=gen, dtype=w.dtype).to(w.device)
        dense_us.append(_median_us(layer, x, repeats))
        sparse_us.append(_median_us(sparse, x, repeats))
    faster = all(s < d for s, d in zip(sparse_us, dense_us, strict=True))
    reason = ("sparse faster at every batch size" if faster
              else "dense faster at some batch size")
    choice = LayerChoice(**row, dense_us=tuple(dense_us), sparse_us=tuple(sparse_us),
                         choice="sparse" if faster else "dense", reason=reason)
    return choice, sparse if faster else None


def sparsify(model: nn.Module, example_input: Inputs, *,
             batch_sizes: Sequence[int] = (1,), min_sparsity: float = 0.8,
             repeats: int = 200, threads: int | None = 1,
             seed: int = 0) -> tuple[nn.Module, SparsifyReport]:
    """Swap each sufficiently sparse ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` for its
    sparse module where the measured sparse path is faster (in place; also returned, and
    only returned when the model is itself one such layer).

    ``example_input`` ``[B, *sample_shape]`` is run once to capture each layer's input
    shape; each candidate is then timed (median of ``repeats`` calls, ``threads`` intra-op
    threads, ``None`` = leave as is) on seeded random input of batch ``b`` for every ``b``
    in ``batch_sizes``. Outputs equal the dense model's to float tolerance.
    """
    batches = tuple(int(b) for b in batch_sizes)
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    previous = torch.get_num_threads()
    was_training = model.training
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        shapes = _capture_inputs(model, example_input)
        rows = []
        for name, layer in _candidates(model):
            row, sparse = _decide(name, layer, shapes.get(name), batches, min_sparsity,
                                  repeats, seed)
            rows.append(row)
            if sparse is not None:
                model = _put(model, name, sparse)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
    return model, SparsifyReport(layers=tuple(rows), threads=used)


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse module (:class:`SparseLinear`, :class:`SparseConv`) by the
    equivalent dense layer (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, _SPARSE_MODULES)]
    for name in names:
        model = _put(model, name, model.get_submodule(name).to_dense())
    return model


def _put(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """``module`` at ``name`` in ``model``; the model itself when ``name`` is ``""`` (a
    model that is one layer is replaced, not modified: use the returned model)."""
    if not name:
        return module
    model.set_submodule(name, module)
    return model
