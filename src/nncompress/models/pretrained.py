"""Trained reference models on demand: train once with ``train.fit``, then reuse the cache.

A trained model is cached as a packed ``.nnc`` file (written by ``nncompress.formats``;
no pickle) under ``cache_dir()/models`` with a name that encodes every input of training:
``{name}-{dataset}-s{seed}-e{epochs}-{hash}.nnc`` where the hash covers the architecture
config, learning rate, schedule, batch size and :data:`TRAINING_VERSION`. Only models
trained on a bundled dataset with the standard batch size are cached; a model trained on
user data is retrained on every call because the data behind a ``module:function``
reference may change. Weights are bit-identical for the same seed and the same torch
thread count (reductions split differently across threads).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from nncompress.data import Dataset, dataset_names, example_input, load_dataset
from nncompress.errors import FormatError, ModelError
from nncompress.models.base import ArchModule, ModelSpec
from nncompress.models.zoo import build, spec
from nncompress.paths import cache_dir
from nncompress.train import fit

__all__ = ["TRAINING_VERSION", "load"]

#: Bump when the training recipe changes in a way that should invalidate cached models.
TRAINING_VERSION = 1
_BATCH_SIZE = 128
_LR_SCHEDULE = "cosine"


def _build_for(model_spec: ModelSpec, data: Dataset) -> ArchModule:
    """Build the model for ``data``; a shape that does not fit names both model and data."""
    fits = f"model {model_spec.name!r} does not fit dataset {data.name!r}"
    try:
        model = build(model_spec.name, data.input_shape, data.num_classes)
    except ModelError as exc:
        raise ModelError(f"{fits}: {exc}") from exc
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(data, 2))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ModelError(f"{fits} (inputs shaped {data.input_shape}): {exc}") from exc
    return model


def _cache_path(model_spec: ModelSpec, model: ArchModule, data: Dataset, seed: int,
                epochs: int) -> Path:
    key = {
        "arch": model.arch_name,
        "config": model.arch_config(),
        "lr": model_spec.lr,
        "schedule": _LR_SCHEDULE,
        "batch_size": _BATCH_SIZE,
        "training_version": TRAINING_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{model_spec.name}-{data.name}-s{seed}-e{epochs}-{digest}.nnc"
    return cache_dir() / "models" / name


def _read_cached(path: Path, skeleton: nn.Module) -> nn.Module | None:
    if not path.is_file():
        return None
    from nncompress import formats

    try:
        return formats.load(path, skeleton=skeleton)
    except FormatError:  # a truncated or stale file: train again and overwrite it
        return None


def _write_cached(path: Path, model: nn.Module, meta: dict[str, object]) -> None:
    from nncompress import formats

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.nnc")
    try:
        formats.save(model, tmp, meta=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(name: str, dataset: str | Dataset | None = None, *, seed: int = 0,
         epochs: int | None = None, progress: bool = True,
         retrain: bool = False) -> tuple[nn.Module, Dataset]:
    """A trained reference model and the data it was trained on, in eval mode.

    ``dataset`` is a dataset name or ref (default: the model's own), or a loaded
    :class:`Dataset`. ``seed`` seeds the weights and the batch order; ``epochs`` defaults
    to the model's spec. The first call trains (with a progress bar unless
    ``progress=False``) and caches; later calls load the cache unless ``retrain=True``.
    """
    model_spec = spec(name)
    if isinstance(dataset, Dataset):
        data = dataset
    else:
        data = load_dataset(dataset or model_spec.default_dataset, batch_size=_BATCH_SIZE,
                            seed=seed)
    run_epochs = model_spec.epochs if epochs is None else epochs
    torch.manual_seed(seed)
    model = _build_for(model_spec, data)
    cacheable = data.name in dataset_names() and data.train.batch_size == _BATCH_SIZE
    path = _cache_path(model_spec, model, data, seed, run_epochs) if cacheable else None
    cached = None if path is None or retrain else _read_cached(path, model)
    if cached is not None:
        return cached.eval(), data
    log = fit(model, data, epochs=run_epochs, lr=model_spec.lr, seed=seed, progress=progress,
              desc=f"train {name} on {data.name}", lr_schedule=_LR_SCHEDULE)
    if path is not None:
        meta: dict[str, object] = {
            "model": name, "dataset": data.name, "seed": seed, "epochs": run_epochs,
            "lr": model_spec.lr, "lr_schedule": _LR_SCHEDULE,
            "test_accuracy": log.final_test_acc, "train_seconds": round(log.total_seconds, 3),
        }
        _write_cached(path, model, meta)
    return model.eval(), data
