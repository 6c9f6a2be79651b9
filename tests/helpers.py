"""Shared test data: a tiny, seeded classification problem (label = argmax of the first
``classes`` features), small enough for tests to train on in a fraction of a second."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import DataLoader, TensorDataset

from nncompress.data import Dataset


def tiny_data(n: int = 96, features: int = 12, classes: int = 3, seed: int = 0) -> Dataset:
    """``n`` samples shaped ``[1, features]``; train batches of 16 (shuffled), test of 48."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, features, generator=g)
    y = x[:, 0, :classes].argmax(dim=1)
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator())
    return Dataset("tiny", train, DataLoader(ds, batch_size=48), (1, features), classes)


def bench_module(filename: str, name: str) -> ModuleType:
    """A module of ``bench/`` (which is not a package) loaded by path under ``name``."""
    path = Path(__file__).resolve().parents[1] / "bench" / filename
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
