"""Bench section: the sparse inference engine (EIE idea in software).

Two parts, both 1 CPU thread, fp32:

* single Linear layers of LeNet-300-100 on 28x28 input (300x784, 100x300), and cnn1d's
  largest convolution (64->128 channels, kernel 5, on its 10-sample feature map), with
  random weights pruned at random to 90 / 95 / 99 %: the dense layer vs the CSR
  ``SparseLinear`` / im2col+CSR ``SparseConv`` (median of 300 calls each, as timed by
  ``kernels.sparsify``);
* the whole trained LeNet-300-100 on digits (``models.load("mlp", "digits")``, 8x8 input
  so fc1 is 300x64) pruned with the ``gradual-prune`` recipe (92 %), saved and re-loaded
  with ``nc.save`` / ``nc.load`` (the deployment flow), then ``kernels.sparsify`` run for
  each batch size: every Linear is timed dense vs CSR on its real input shape and the
  sparse path is used only where faster. Whole-model time is
  ``nncompress.measure.latency`` (median of 200 calls, ms per batch).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.kernels import sparsify
from nncompress.measure import latency
from nncompress.report import fmt_ms, fmt_pct, fmt_ratio, render_markdown

SEED = 0
BATCHES = (1, 256)
LAYERS = ((300, 784), (100, 300))
SPARSITIES = (0.90, 0.95, 0.99)


@dataclass(frozen=True)
class SparseEngineRow:
    subject: str
    weight_sparsity: float
    batch: int
    dense_ms: float
    sparse_ms: float
    chosen: str

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def _random_pruned(layer: nn.Module, sparsity: float) -> nn.Sequential:
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=g) < sparsity] = 0.0
    return nn.Sequential(layer).eval()


def _layers() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    """(label, fresh layer, input shape of one sample): LeNet-300-100's Linear layers on
    28x28 input, and cnn1d's largest convolution on its mnist1d feature map."""
    rows: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
        (f"Linear {o}x{i}", lambda o=o, i=i: nn.Linear(i, o), (i,)) for o, i in LAYERS]
    rows.append(("Conv1d 64->128, k5 (cnn1d conv3)",
                 lambda: nn.Conv1d(64, 128, 5, padding=2), (64, 10)))
    return rows


def _layer_rows() -> list[SparseEngineRow]:
    rows = []
    for label, make, shape in _layers():
        for sparsity in SPARSITIES:
            for b in BATCHES:
                torch.manual_seed(SEED)
                model = _random_pruned(make(), sparsity)
                _, rep = sparsify(model, torch.randn(1, *shape), batch_sizes=(b,),
                                  repeats=300, seed=SEED)
                r = rep.layers[0]
                rows.append(SparseEngineRow(label, r.sparsity, b, r.dense_us[0] / 1e3,
                                            r.sparse_us[0] / 1e3, r.choice))
    return rows


def _whole_model_row(dense: nn.Module, data: Dataset, batch: int) -> SparseEngineRow:
    shape = tuple(data.input_shape)
    sparse, report = sparsify(copy.deepcopy(dense), example_input(data, batch=1),
                              batch_sizes=(batch,), repeats=200, seed=SEED)
    probe = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(probe), dense(probe), rtol=1e-5, atol=1e-5)
    t_dense = latency(dense, shape, (batch,), repeats=200, threads=1).results[0].median_ms
    t_sparse = latency(sparse, shape, (batch,), repeats=200, threads=1).results[0].median_ms
    ws = [m.weight for m in dense.modules() if isinstance(m, nn.Linear)]
    sparsity = 1.0 - sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)
    chosen = "sparse: " + ", ".join(report.sparse_layers) if report.sparse_layers else "dense"
    return SparseEngineRow("mlp/digits, whole model", sparsity, batch, t_dense, t_sparse,
                           chosen)


def bench_sparse_engine(echo: Callable[[str], None]) -> list[SparseEngineRow]:
    """Layer rows then whole-model rows (see the module docstring)."""
    echo("sparse engine: single pruned Linear layers, dense vs CSR")
    rows = _layer_rows()
    echo("sparse engine: gradual-prune on mlp/digits, then sparsify")
    model, data = zoo.load("mlp", "digits", progress=False)
    result = nc.compress(model, "gradual-prune", data, seed=SEED, progress=False,
                         measure_latency=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.nnc"
        nc.save(result.model, path)
        dense = nc.load(path).eval()
    rows += [_whole_model_row(dense, data, b) for b in BATCHES]
    for r in rows:
        echo(f"  {r.subject} {100 * r.weight_sparsity:.1f}% batch {r.batch}: dense "
             f"{r.dense_ms:.4f} ms, sparse path {r.sparse_ms:.4f} ms -> {r.chosen}")
    return rows


def sparse_engine_markdown(rows: list[SparseEngineRow]) -> str:
    headers = ["layer / model", "weight sparsity", "batch", "dense fp32 (ms/batch)",
               "after sparsify (ms/batch)", "speedup", "automatic choice"]
    cells = [[r.subject, fmt_pct(r.weight_sparsity), str(r.batch), fmt_ms(r.dense_ms),
              fmt_ms(r.sparse_ms), fmt_ratio(r.speedup), r.chosen] for r in rows]
    return render_markdown(headers, cells)
