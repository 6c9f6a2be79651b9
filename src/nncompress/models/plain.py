"""Plain PyTorch models of the shapes users bring: no ``ArchModule``, only ``torch.nn``
building blocks, each trained on a bundled dataset.

They are what ``make bench`` and the tests run every technique on besides the reference
zoo, so that nothing works only on models written around nncompress:

- ``bigru``: 2-layer bidirectional ``nn.GRU`` on MNIST-1D (time steps of 1 feature);
- ``lstm_proj``: ``nn.LSTM`` with ``proj_size`` (LSTMP) on MNIST-1D, read through its
  output and its final state ``h_n``;
- ``inception1d``: an inception-style 1-D CNN -- parallel 1x1, 3-tap and grouped 5-tap
  branches concatenated, BatchNorm and GroupNorm -- on MNIST-1D;
- ``encoder``: ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` s over
  4-sample patches of MNIST-1D;
- ``text``: a token-id classifier (``nn.Embedding`` -> ``nn.TransformerEncoder`` with a
  padding mask -> masked mean) on ``mnist1d-tokens``, whose inputs are a dict of int64
  ids and a bool mask.

:func:`load_plain` trains one once (Adam, cosine schedule) and caches its weights as a
``.nnc`` under ``cache_dir()/plain`` (loaded back into a fresh instance: no pickle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nncompress.data import Dataset, load_dataset
from nncompress.errors import ModelError
from nncompress.paths import cache_dir

__all__ = ["PLAIN", "PlainSpec", "load_plain", "plain_names"]


class BiGRU(nn.Module):
    """``[B, 1, 40]`` -> 2-layer bidirectional GRU -> last step -> LayerNorm -> Linear."""

    def __init__(self, hidden: int = 48, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(self.norm(out[:, -1]))


class ProjLSTM(nn.Module):
    """``[B, 1, 40]`` -> LSTM(hidden 96, proj_size 32) -> Linear on the last output plus a
    Linear on ``h_n``."""

    def __init__(self, hidden: int = 96, proj: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, proj_size=proj, batch_first=True)
        self.head = nn.Linear(proj, classes)
        self.state = nn.Linear(proj, classes)
        with torch.no_grad():  # forget-gate bias 1 (Jozefowicz et al. 2015)
            self.rnn.bias_ih_l0[hidden:2 * hidden].fill_(1.0)
            self.rnn.bias_hh_l0[hidden:2 * hidden].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1]) + self.state(h[-1])


class Inception1d(nn.Module):
    """Stem conv, then three parallel branches (1x1; 3-tap; grouped 5-tap, groups=4)
    concatenated, BatchNorm / GroupNorm, a 1x1 mix and global average pooling."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 5, stride=2, padding=2),
                                  nn.BatchNorm1d(width), nn.ReLU())
        self.b1 = nn.Conv1d(width, width // 2, 1)
        self.b3 = nn.Conv1d(width, width // 2, 3, padding=1)
        self.b5 = nn.Conv1d(width, width, 5, padding=2, groups=4)
        self.norm = nn.GroupNorm(4, 2 * width)
        self.mix = nn.Conv1d(2 * width, 2 * width, 1)
        self.bn = nn.BatchNorm1d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.norm(torch.cat([self.b1(h), self.b3(h), self.b5(h)], dim=1)))
        h = torch.relu(self.bn(self.mix(h)))
        return self.head(h.mean(dim=-1))


class Encoder(nn.Module):
    """``[B, 1, 40]`` -> 10 patches of 4 -> Linear -> ``nn.TransformerEncoder`` (2 layers,
    4 heads, pre-norm) -> mean -> Linear."""

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.zeros(1, 10, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 10, 4)) + self.pos
        return self.head(self.encoder(h).mean(dim=1))


class TextClassifier(nn.Module):
    """``ids`` int64 ``[B, T]`` and ``mask`` bool ``[B, T]`` -> Embedding + learned positions
    -> ``nn.TransformerEncoder`` with a key padding mask -> masked mean -> Linear."""

    def __init__(self, vocab: int = 33, dim: int = 64, length: int = 40,
                 classes: int = 10) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=0)
        self.positions = nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tokens(ids) + self.positions(pos), src_key_padding_mask=~mask)
        keep = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0))


@dataclass(frozen=True)
class PlainSpec:
    """A plain model: how to build it, the bundled dataset it trains on, and for how long."""

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    epochs: int
    lr: float
    description: str


PLAIN: dict[str, PlainSpec] = {s.name: s for s in (
    PlainSpec("bigru", BiGRU, "mnist1d", 12, 1e-2,
              "2-layer bidirectional nn.GRU + LayerNorm"),
    PlainSpec("lstm_proj", ProjLSTM, "mnist1d", 20, 1e-2,
              "nn.LSTM with proj_size, read through output and h_n"),
    PlainSpec("inception1d", Inception1d, "mnist1d", 15, 3e-3,
              "inception-style 1-D CNN: grouped conv, concatenation, GroupNorm"),
    PlainSpec("encoder", Encoder, "mnist1d", 25, 3e-3,
              "nn.TransformerEncoder (pre-norm) over patches"),
    PlainSpec("text", TextClassifier, "mnist1d-tokens", 25, 3e-3,
              "token ids + padding mask: nn.Embedding + nn.TransformerEncoder"),
)}


def plain_names() -> tuple[str, ...]:
    return tuple(PLAIN)


def load_plain(name: str, *, seed: int = 0, progress: bool = False
               ) -> tuple[nn.Module, Dataset]:
    """A trained plain model and its dataset (trained on first use, then cached)."""
    from nncompress import api, train

    if name not in PLAIN:
        raise ModelError(f"unknown plain model {name!r}; known: {', '.join(PLAIN)}")
    spec = PLAIN[name]
    data = load_dataset(spec.dataset, seed=seed)
    path = cache_dir() / "plain" / f"{name}-s{seed}-e{spec.epochs}.nnc"
    torch.manual_seed(seed)
    model = spec.build()
    if path.is_file():
        return api.load(path, skeleton=model).eval(), data
    train.fit(model, data, epochs=spec.epochs, lr=spec.lr, seed=seed, progress=progress,
              desc=f"train {name}", lr_schedule="cosine")
    path.parent.mkdir(parents=True, exist_ok=True)
    api.save(model, path)
    return model.eval(), data
