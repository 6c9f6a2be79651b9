"""Per-layer sensitivity to weight quantization, for mixed precision (HAWQ).

- Dong, Yao, Gholami, Mahoney & Keutzer (2019), "HAWQ: Hessian AWare Quantization of
  neural networks with mixed-precision": the curvature of the loss says how much a layer
  minds being quantized;
- Dong, Yao, Arfeen, Gholami, Mahoney & Keutzer (2020), "HAWQ-V2: Hessian aware
  trace-weighted quantization of neural networks": the measure is the average Hessian
  trace of the layer's weight block, ``Tr(H_l) / n_l`` (``n_l`` weights), estimated by
  Hutchinson's method, times the perturbation ``||Q_b(W_l) - W_l||^2``:
  ``Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2``;
- Yao, Dong, Zheng, Gholami, Yu, Tan, Wang, Huang, Mahoney & Keutzer (2021), "HAWQ-V3:
  dyadic neural network quantization": choose the widths minimising ``sum_l Omega_l(b_l)``
  under a size constraint (:func:`nncompress.quant.mixed.allocate`).

Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines": ``Tr(H) = E[v^T H v]`` for ``v`` with independent Rademacher
(+-1) entries. One ``v`` over all selected weights at once gives every block's trace:
``E[v_l^T (H v)_l] = Tr(H_ll)`` (the cross terms have mean 0). ``H v`` is a Hessian-vector
product by double backpropagation (Pearlmutter, 1994, "Fast exact multiplication by the
Hessian"): ``H v = d/dw (dL/dw . v)``. The loss is the mean cross-entropy of a training
batch with the model in eval mode (dropout off, BatchNorm on its running statistics). A
negative estimate (a layer at a saddle, or noise) is floored at 0 by the caller.

The alternative measure (``sensitivity: accuracy``) quantizes one layer at a time at each
width, without training, and records the top-1 accuracy drop on the same training batches
(floored at 0).

``Q_b`` is the quantizer the ``lowbit`` technique starts from (:mod:`nncompress.quant.lsq`,
its step initialised from the weight), so the measure matches what training begins with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nncompress import inputs
from nncompress.errors import UnsupportedLayerError
from nncompress.measure.quality import top1
from nncompress.quant.lsq import make_quantizer

__all__ = ["Batch", "accuracy_drops", "hessian_traces", "hutchinson_traces", "perturbations",
           "quantize"]

Batch = tuple[inputs.Inputs, torch.Tensor]


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``like``'s shape with independent +-1 entries (equally likely)."""
    bits = torch.randint(0, 2, like.shape, generator=generator)
    return (2 * bits - 1).to(dtype=like.dtype, device=like.device)


def hutchinson_traces(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *,
                      samples: int, generator: torch.Generator) -> list[float]:
    """The trace of the Hessian block of each of ``params`` (which require grad) for the
    scalar ``loss()``, Hutchinson's estimate over ``samples`` Rademacher vectors (one loss
    evaluation, one gradient with a graph, ``samples`` Hessian-vector products)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    value = loss()
    grads = torch.autograd.grad(value, list(params), create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads, strict=True)]
    sums = [0.0] * len(pairs)
    for _ in range(samples):
        vs = [_rademacher(p, generator) for p in params]
        dot = sum(((g * v).sum() for (_, g), v in zip(pairs, vs, strict=True)
                   if g is not None and g.requires_grad), torch.zeros(()))
        if not dot.requires_grad:  # the loss is linear in every parameter: H = 0
            continue
        hvs = torch.autograd.grad(dot, list(params), retain_graph=True, allow_unused=True)
        for i, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
            if hv is not None:
                sums[i] += float((hv * v).sum())
    return [s / samples for s in sums]


@contextmanager
def _grad_on(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` on for ``tensors`` inside the block, as before after it."""
    before = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t, flag in zip(tensors, before, strict=True):
            t.requires_grad_(flag)


def hessian_traces(model: nn.Module, layers: Sequence[str], batches: Sequence[Batch], *,
                   samples: int, seed: int) -> dict[str, float]:
    """``{layer: Tr(H_l)}``: the trace of the cross-entropy's Hessian block of each
    layer's ``weight``, averaged over ``batches`` (``samples`` Rademacher vectors each,
    drawn from a generator seeded with ``seed``). The model is in eval mode afterwards;
    its weights are unchanged."""
    weights = [model.get_submodule(name).weight for name in layers]
    generator = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(layers)
    model.eval()
    # the math attention kernel: the fused ones (flash / memory-efficient) of
    # nn.MultiheadAttention and F.scaled_dot_product_attention have no double backward
    with _grad_on(weights), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for x, y in batches:
            def loss(x: inputs.Inputs = x, y: torch.Tensor = y) -> torch.Tensor:
                return F.cross_entropy(inputs.call(model, x), y)
            try:
                traces = hutchinson_traces(loss, weights, samples=samples, generator=generator)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UnsupportedLayerError(
                    f"mixed_precision: Hessian-vector products fail on this model ({first}); "
                    "use sensitivity: accuracy") from None
            totals = [t + s for t, s in zip(totals, traces, strict=True)]
    for w in weights:
        w.grad = None
    return {name: t / len(batches) for name, t in zip(layers, totals, strict=True)}


def quantize(weight: torch.Tensor, bits: int, *, quantizer: str = "linear",
             init: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` through a signed ``bits``-bit quantizer whose step is initialised from it
    (as the ``lowbit`` technique starts): its codes (int8, what the container stores) and
    ``Q_b(W)`` (float32)."""
    q = make_quantizer(quantizer, bits, signed=True, init=init)
    w = weight.detach().float()
    q.initialise(w)
    codes = q.codes(w)
    return codes.to(torch.int8), q.values(codes)


def perturbations(model: nn.Module, values: Mapping[str, Mapping[int, torch.Tensor]]
                  ) -> dict[str, dict[int, float]]:
    """``{layer: {b: ||Q_b(W) - W||^2}}`` from ``values`` = ``{layer: {b: Q_b(W)}}``."""
    out: dict[str, dict[int, float]] = {}
    for name, per_width in values.items():
        w = model.get_submodule(name).weight.detach().float()
        out[name] = {b: float(((q - w) ** 2).sum()) for b, q in per_width.items()}
    return out


def _accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((inputs.call(model, x).argmax(dim=-1) == top1(y)).sum())
            total += len(y)
    return correct / max(total, 1)


def accuracy_drops(model: nn.Module, values: Mapping[str, Mapping[int, torch.Tensor]],
                   batches: Sequence[Batch]) -> dict[str, dict[int, float]]:
    """``{layer: {b: top-1 accuracy drop}}`` on ``batches`` with that layer's weight alone
    replaced by ``values[layer][b]`` = ``Q_b(W)`` (no training), floored at 0; every
    weight is restored."""
    model.eval()
    base = _accuracy(model, batches)
    out: dict[str, dict[int, float]] = {}
    for name, per_width in values.items():
        weight = model.get_submodule(name).weight
        kept = weight.detach().clone()
        out[name] = {}
        try:
            for b, q in per_width.items():
                with torch.no_grad():
                    weight.copy_(q)
                out[name][b] = max(0.0, base - _accuracy(model, batches))
        finally:
            with torch.no_grad():
                weight.copy_(kept)
    return out
