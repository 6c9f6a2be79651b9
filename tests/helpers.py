"""Shared test data: a tiny, seeded classification problem (label = argmax of the first
``classes`` features), small enough for tests to train on in a fraction of a second; tiny
versions of the seven reference models and their int8 programs (the export tests)."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress import cli
from nncompress.data import Dataset

#: reference model -> (per-sample input shape, ``models.build`` overrides) of a tiny version
TINY_MODELS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "mlp": ((1, 5, 7), {"hidden": [11, 6]}),
    "cnn1d": ((1, 23), {"channels": [5, 7, 9]}),
    "cnn2d": ((1, 9, 9), {"channels": [3, 5], "hidden": [10, 6]}),
    "rescnn": ((1, 21), {"channels": 6, "hidden": [8, 8]}),      # residual + depthwise
    "gru": ((1, 7), {"hidden": [6, 5]}),
    "lstm": ((1, 7), {"hidden": [6, 5]}),
    "transformer": ((1, 20), {"patch_size": 4, "dim": 8, "depth": 1, "num_heads": [2],
                              "head_dim": [4], "mlp_dim": [12]}),
}


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


def fold_on(model: nn.Module, x: torch.Tensor) -> None:
    """``fold_batchnorm`` with ``x`` as the data it reads its example from."""
    from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
    from nncompress.technique import Context

    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.int64)),
                        batch_size=len(x))
    data = Dataset("calibration", loader, loader, tuple(x.shape[1:]), 3)
    fold_batchnorm(model, FoldBatchNormConfig(), Context(data=data, progress=False))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def tiny_program(name: str) -> tuple[Any, tuple[int, ...]]:
    """The int8 program of the tiny ``name`` (seeded; BatchNorm statistics made
    non-trivial, then folded; calibrated on two random batches) and its input shape."""
    from nncompress import models
    from nncompress.quant.convert import convert

    shape, overrides = TINY_MODELS[name]
    torch.manual_seed(0)
    model = models.build(name, shape, 3, **overrides).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn((16, *shape), generator=g) for _ in range(2)]
    with torch.no_grad():   # BatchNorm with non-trivial statistics, then folded
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fold_on(model, calibration[0])
    program, _ = convert(model, calibration)
    return program, shape


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``nncompress ARGV`` in-process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str, source: str,
                files: dict[str, str] | None = None) -> Iterator[str]:
    """For a fixture: a user module of ``source`` with a unique name (``prefix`` + hex:
    sys.modules caches modules by name) in ``tmp_path``, made the cwd with its own model
    cache, plus ``files`` beside it; yields the module's name, then forgets the module."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text(source)
    for file, text in (files or {}).items():
        (tmp_path / file).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))   # for the test's own imports; main drops it
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    yield name
    sys.modules.pop(name, None)
