"""Layer types nncompress builds models from, and rewrites of PyTorch built-ins.

- :mod:`nncompress.modules.attention`: ``SplitMultiheadAttention`` and
  ``SplitTransformerEncoderLayer``, equivalents of ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer`` whose every weight sits in a called Linear.
- :mod:`nncompress.modules.rewrite`: :func:`decompose` swaps them in.
"""

from nncompress.modules.attention import (
    ACTIVATIONS,
    SplitMultiheadAttention,
    SplitTransformerEncoderLayer,
    activation_name,
)
from nncompress.modules.rewrite import decompose, needs_decompose

__all__ = [
    "ACTIVATIONS",
    "SplitMultiheadAttention",
    "SplitTransformerEncoderLayer",
    "activation_name",
    "decompose",
    "needs_decompose",
]
