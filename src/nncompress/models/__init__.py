"""Reference models, their registry and the pretrained cache.

- :data:`ARCHITECTURES`: ``arch_name -> ArchModule subclass`` (formats rebuild saved models
  from ``arch_name`` + ``arch_config()`` through it);
- :func:`build`, :func:`model_names`, :func:`spec`: the reference-model table;
- :func:`load`: a trained reference model (trained on first use, then cached as ``.nnc``);
- :func:`scaled`, :func:`student_of`: distillation students (``students.py``), including
  the MobileNet / ShuffleNet networks of ``blocks.py``.
"""

from nncompress.models.base import ARCHITECTURES, MODELS, ArchModule, ModelSpec
from nncompress.models.blocks import MobileNet1d, MobileNet2d, ShuffleNet1d, ShuffleNet2d
from nncompress.models.cnn import CNN1d, CNN2d
from nncompress.models.mlp import MLP
from nncompress.models.pretrained import load
from nncompress.models.recurrent import GRUClassifier, LSTMClassifier
from nncompress.models.rescnn import InvertedResidual1d, ResCNN
from nncompress.models.students import scaled, student_of
from nncompress.models.transformer import (
    FeedForward,
    MultiHeadSelfAttention,
    TinyTransformer,
    TransformerBlock,
)
from nncompress.models.zoo import build, model_names, spec

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "MODELS",
    "ArchModule",
    "CNN1d",
    "CNN2d",
    "FeedForward",
    "GRUClassifier",
    "InvertedResidual1d",
    "LSTMClassifier",
    "MobileNet1d",
    "MobileNet2d",
    "ModelSpec",
    "MultiHeadSelfAttention",
    "ResCNN",
    "ShuffleNet1d",
    "ShuffleNet2d",
    "TinyTransformer",
    "TransformerBlock",
    "build",
    "load",
    "model_names",
    "scaled",
    "spec",
    "student_of",
]
