"""Our int8 artifacts for the int8 bench section (``bench/int8.py``).

Each builder takes a trained reference model and its data and returns what a user ships:
the ``.nnc`` file of the ``Int8Model`` (its bytes on disk) and that file loaded back and
run (the generated-C engine at batch 1 and 256), so the latency is that of the model the
user gets back. ``ptq``: ``quantize_int8`` (minmax calibration on 8 training batches);
``qat``: ``qat_int8`` (2 epochs at lr 1e-4 from the PTQ ranges).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import nncompress as nc
from int8_peers import Artifact, as_numpy
from nncompress.data import Dataset
from nncompress.technique import Context, all_techniques

__all__ = ["BUILDERS", "ptq", "qat"]

SEED = 0


def _artifact(label: str, model: nn.Module, data: Dataset, technique: str,
              options: dict) -> Artifact:
    tech = all_techniques().get(technique)
    ctx = Context(data=data, seed=SEED, progress=False)
    torch.manual_seed(SEED)
    q = tech.apply(copy.deepcopy(model), tech.config(**options), ctx)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.nnc"
        size = nc.save(q, path)
        loaded = nc.load(path)
    kept = [op.source for op in loaded.program.float_ops()]
    engine = "C engine" if _engine_ok(loaded, data) else "integer reference (no C engine)"

    def predict(x: np.ndarray | torch.Tensor) -> np.ndarray:
        # what a user writes: the int8 model computes no gradients, so no inference_mode
        return loaded(torch.as_tensor(as_numpy(x))).numpy()

    notes = f"runs in the {engine}; float32 ops: {', '.join(kept) if kept else 'none'}"
    return Artifact(label, predict, int(size), notes=notes, kind="ours")


def _engine_ok(model: nn.Module, data: Dataset) -> bool:
    x = next(iter(data.test))[0][:1]
    try:
        model.engine(x)
    except Exception:
        return False
    return True


def ptq(name: str, model: nn.Module, data: Dataset) -> Artifact:
    return _artifact("nncompress int8 PTQ (.nnc)", model, data, "quantize_int8", {})


def qat(name: str, model: nn.Module, data: Dataset) -> Artifact:
    return _artifact("nncompress int8 QAT (.nnc)", model, data, "qat_int8", {"epochs": 2})


#: (builder, accuracy budget as a fraction) as issue 9 sets them: PTQ 0.5 pt, QAT 0.3 pt
BUILDERS = ((ptq, 0.005), (qat, 0.003))


def pruned_rnn_section(names: tuple[str, ...] = ("gru", "lstm")) -> str:
    """Hidden-unit pruning + int8 (recipe ``prune-int8``) on the recurrent models: test
    accuracy and ``.nnc`` bytes against fp32 ``torch.save`` (issue 9: the GRU >= 10x
    smaller at <= 1 pt)."""
    import io

    from nncompress import models as zoo
    from nncompress.report import fmt_bytes, fmt_pct, fmt_ratio, render_markdown
    rows = []
    for name in names:
        model, data = zoo.load(name, "mnist1d", seed=SEED, progress=False)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        result = nc.compress(model, "prune-int8", data, seed=SEED, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            size = nc.save(result.model, Path(tmp) / "m.nnc")
        base, final = result.baseline.accuracy, result.final.accuracy
        drop = 100 * (final - base)
        rows.append([name, fmt_pct(base), fmt_pct(final), f"{drop:+.2f} pt",
                     fmt_bytes(len(buffer.getvalue())), fmt_bytes(size),
                     fmt_ratio(len(buffer.getvalue()) / size),
                     "yes" if drop >= -1.0 and len(buffer.getvalue()) / size >= 10 else "NO"])
    return "\n".join([
        "### Hidden-unit pruning + int8 on the recurrent models (recipe `prune-int8`)", "",
        "Half of every hidden-unit group removed by L1 norm (all gates of a unit together), "
        "8 epochs of fine-tuning, then `quantize_int8`; bytes: fp32 `torch.save` of the "
        "trained model vs the `.nnc` file. Target (issue 9): >= 10x smaller at <= 1 pt.", "",
        render_markdown(["model", "fp32 accuracy", "pruned int8 accuracy", "Δ", "fp32 "
                         "torch.save", ".nnc", "ratio", ">= 10x at <= 1 pt"], rows)])
