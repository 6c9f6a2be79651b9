"""Low-bit weights for ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (the ``lowbit`` technique's
recurrent layers).

Every weight matrix of the layer (``weight_ih_l*``, ``weight_hh_l*``, an LSTM's projection
``weight_hr_l*``, each direction) gets its own signed quantizer of :mod:`nncompress.quant.lsq`
(one step per matrix, LSQ-learned or power-of-two levels, as for Linear layers). Biases,
the recurrent state, the gates' nonlinearities and the inputs stay float: the gates' sums
already run on low-bit weights, and the state is what the layer carries between steps.

- Training: :func:`to_training` turns the layer, in place, into its training class
  (:class:`LowBitGRU` ...: the same layer, parameter names unchanged, plus a
  ``weight_quant`` dict of quantizers); its forward runs the float layer on the
  fake-quantized matrices (``torch.func.functional_call``; straight-through gradients).
- Frozen: :func:`freeze` snaps every matrix to its grid in place and gives the plain
  PyTorch layer back. A matrix on a ``b``-bit grid holds at most ``2**b - 1`` distinct
  values, so the ``.nnc`` container's automatic choice (a codebook, or better) stores it
  in about ``b`` bits per weight, losslessly (docs/FORMAT.md), and the model stays an
  ``nn.GRU`` / ``nn.LSTM`` that every other path (int8 conversion, ONNX export, loading
  into a user's skeleton) reads as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nncompress.quant.lsq import make_quantizer

__all__ = ["RECURRENT", "LowBitGRU", "LowBitLSTM", "LowBitRNN", "freeze", "to_training",
           "weight_names"]


def weight_names(layer: nn.RNNBase) -> list[str]:
    """The layer's weight matrices (every layer and direction; no biases)."""
    return [n for n in layer._flat_weights_names if n.startswith("weight_")]


class _LowBitRecurrent:
    """Forward on fake-quantized weight matrices (mixed into the PyTorch RNN classes)."""

    weight_quant: nn.ModuleDict
    weight_bits: int
    quantizer: str
    _quantizing: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._quantizing:  # the call functional_call makes, on the swapped weights
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        layer: Any = self
        swapped = {n: layer.weight_quant[n](getattr(layer, n)) for n in layer.weight_quant}
        self._quantizing = True
        try:
            return torch.func.functional_call(layer, swapped, args, kwargs)
        finally:
            self._quantizing = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self.weight_bits}-bit "  # type: ignore[misc]
                f"{self.quantizer} weight matrices")


class LowBitGRU(_LowBitRecurrent, nn.GRU):
    """Training form of an ``nn.GRU`` with low-bit weight matrices."""


class LowBitLSTM(_LowBitRecurrent, nn.LSTM):
    """Training form of an ``nn.LSTM`` with low-bit weight matrices."""


class LowBitRNN(_LowBitRecurrent, nn.RNN):
    """Training form of an ``nn.RNN`` with low-bit weight matrices."""


#: float recurrent layer type (exact) -> its training class.
RECURRENT: dict[type[nn.Module], type[nn.Module]] = {
    nn.GRU: LowBitGRU, nn.LSTM: LowBitLSTM, nn.RNN: LowBitRNN}
_BASE = {v: k for k, v in RECURRENT.items()}


def to_training(layer: nn.RNNBase, *, weight_bits: int, quantizer: str = "linear",
                init: str = "mse") -> nn.RNNBase:
    """``layer`` as its training class, in place (its parameters and their names are
    kept; each matrix's step is initialised from it); returns it."""
    cls = RECURRENT[type(layer)]
    quant = nn.ModuleDict()
    for name in weight_names(layer):
        q = make_quantizer(quantizer, weight_bits, signed=True, init=init)
        q.initialise(getattr(layer, name))
        quant[name] = q.to(getattr(layer, name).device)
    layer.__class__ = cls
    trained: Any = layer
    trained.weight_quant = quant
    trained.weight_bits, trained.quantizer, trained._quantizing = weight_bits, quantizer, False
    return layer


def freeze(layer: nn.RNNBase) -> nn.RNNBase:
    """Snap every weight matrix to its quantizer's grid, in place, and give the plain
    PyTorch layer back (the quantizers are dropped)."""
    trained: Any = layer
    with torch.no_grad():
        for name, q in trained.weight_quant.items():
            q.eval()
            w = getattr(layer, name)
            w.copy_(q(w))
    del trained.weight_quant
    for attr in ("weight_bits", "quantizer", "_quantizing"):
        delattr(trained, attr)
    layer.__class__ = _BASE[type(layer)]
    return layer
