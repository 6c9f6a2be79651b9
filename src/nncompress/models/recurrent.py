"""Recurrent reference models for MNIST-1D: GRU and LSTM classifiers.

GRU: Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder" (2014).
LSTM: Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997); the forget-gate bias
starts at 1 (Jozefowicz, Zaremba & Sutskever, 2015), without which the LSTM barely learns
MNIST-1D in the default budget. MNIST-1D's published GRU baseline is 91%.

Each layer is its own single-layer ``nn.GRU`` / ``nn.LSTM`` in ``layers`` (rather than one
``num_layers=n`` module) so that a hidden-unit pruner can give each layer its own width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ArchModule, check_classes, check_rank, per_layer

__all__ = ["GRUClassifier", "LSTMClassifier", "RecurrentClassifier"]


class RecurrentClassifier(ArchModule):
    """``[B, C, L]`` read as L time steps of C features -> stacked RNN layers (batch_first)
    -> Linear on the last layer's output at the last time step -> ``[B, num_classes]``.

    ``hidden`` is one width repeated ``num_layers`` times (default 2) or one per layer.
    Layers: ``layers.{i}`` (the RNNs), ``classifier``.
    """

    rnn_type: ClassVar[type[nn.RNNBase]]

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: int | Sequence[int] = 64, num_layers: int | None = None) -> None:
        super().__init__()
        arch = self.arch_name
        self.input_shape = check_rank(arch, input_shape, 2, "(features, time steps)")
        if num_layers is not None and (isinstance(num_layers, bool)
                                       or not isinstance(num_layers, int) or num_layers < 1):
            raise ModelError(f"model {arch!r}: num_layers must be a positive integer, "
                             f"got {num_layers!r}")
        if not isinstance(hidden, int) and num_layers is None:
            count = None
        else:
            count = 2 if num_layers is None else num_layers
        widths = per_layer(hidden, count, f"{arch} hidden")
        sizes = (self.input_shape[0], *widths)
        self.layers = nn.ModuleList(
            self.rnn_type(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(widths))
        )
        self.classifier = nn.Linear(widths[-1], check_classes(arch, num_classes))
        self.reset_gate_biases()

    def reset_gate_biases(self) -> None:
        """Hook for gate-specific initialisation (the LSTM's forget-gate bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # [B, L, C]: time steps first, features last
        for rnn in self.layers:
            h, _ = rnn(h)
        return self.classifier(h[:, -1])

    def arch_config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.classifier.out_features,
            "hidden": [rnn.hidden_size for rnn in self.layers],
        }


class GRUClassifier(RecurrentClassifier):
    """GRU classifier (see :class:`RecurrentClassifier`)."""

    arch_name = "gru"
    rnn_type = nn.GRU


class LSTMClassifier(RecurrentClassifier):
    """LSTM classifier (see :class:`RecurrentClassifier`); forget-gate bias set to 1."""

    arch_name = "lstm"
    rnn_type = nn.LSTM

    def reset_gate_biases(self) -> None:
        """Gates are stacked (input, forget, cell, output); set b_ih of the forget gate to 1."""
        with torch.no_grad():
            for rnn in self.layers:
                size = rnn.hidden_size
                rnn.bias_ih_l0[size:2 * size].fill_(1.0)
                rnn.bias_hh_l0[size:2 * size].zero_()
