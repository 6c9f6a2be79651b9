"""Bench section: binarization (BNN / XNOR-Net) and the XNOR-popcount kernel (issue 9).

* Binarized LeNet-300-100 on digits and cnn1d on mnist1d: ``nc.compress`` with the
  packaged ``binarize`` recipe on the cached fp32 reference model, saved with ``nc.save``
  and re-loaded with ``nc.load`` (the model a user gets back). Test accuracy of both;
  weight bytes (every weight matrix / kernel, ``measure.weight_bytes``: fp32 dense vs the
  encoding the container picks, 1 bit per binary weight) and whole ``.nnc`` file bytes.
* The XNOR kernel alone: a 1024x1024 ``FrozenBinaryLinear`` with binary inputs (random
  signs) vs an fp32 ``nn.Linear`` of the same shape, and the whole binarized models vs
  their fp32 versions: ``measure.latency_ab`` (interleaved rounds, median ms per batch,
  ``torch.inference_mode``), batch 1 and 256, the same thread count for both.

Run alone: ``python bench/binary.py`` prints the markdown.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress import train
from nncompress.data import example_input
from nncompress.kernels import xnor
from nncompress.measure import artifact_bytes, weight_bytes
from nncompress.measure.timing import latency_ab
from nncompress.quant.binary_layers import FrozenBinaryLinear
from nncompress.recipe import Recipe, Stage
from nncompress.report import fmt_bytes, fmt_ms, fmt_ratio, render_markdown

SEED = 0
THREADS = 1  # the XNOR kernel runs on one thread; torch gets the same
#: (model, dataset, binarize parameters overriding the packaged recipe's, row label)
MODELS: tuple[tuple[str, str, dict[str, bool], str], ...] = (
    ("mlp", "digits", {}, "BNN"),
    ("cnn1d", "mnist1d", {}, "BNN"),
    ("cnn1d", "mnist1d", {"activations": False}, "weights only (BinaryConnect)"),
)
BATCHES = (1, 256)
ROUNDS, REPEATS = 10, 200
KERNEL_SHAPE = (1024, 1024)
TARGET_WEIGHTS, TARGET_KERNEL = 25.0, 5.0


@dataclass(frozen=True)
class ModelRow:
    name: str
    fp32_acc: float
    binary_acc: float
    fp32_weight_bytes: int
    binary_weight_bytes: int
    fp32_file: int
    binary_file: int
    fp32_ms: dict[int, float]
    binary_ms: dict[int, float]


@dataclass(frozen=True)
class KernelRow:
    batch: int
    fp32_ms: float
    xnor_ms: float


def _weights(model: nn.Module, fp32: bool) -> int:
    rows = weight_bytes(model)
    return sum(4 * r.numel if fp32 else min(r.plain, r.coded) for r in rows)


def _recipe(overrides: dict[str, bool]) -> Recipe:
    packaged = Recipe.named("binarize")
    stage = packaged.stages[0]
    params = {**stage.config.model_dump(), **overrides}
    return Recipe("binarize", (Stage.technique("binarize", **params), *packaged.stages[1:]))


def _model_row(name: str, dataset: str, overrides: dict[str, bool], label: str,
               out_dir: Path, echo: Callable[[str], None], threads: int) -> ModelRow:
    model, data = zoo.load(name, dataset, seed=SEED, progress=False)
    model.eval()
    start = time.perf_counter()
    result = nc.compress(model, _recipe(overrides), data, seed=SEED, progress=False,
                         measure_latency=False)
    path = out_dir / f"{name}-{len(list(out_dir.glob(f'{name}-*.nnc')))}-binary.nnc"
    nc.save(result.model, path)
    binary = nc.load(path).eval()
    echo(f"  binarize {name}: {time.perf_counter() - start:.0f} s")
    reports = latency_ab([model, binary], batch_sizes=BATCHES, rounds=ROUNDS,
                         repeats=REPEATS, threads=threads, example=example_input(data, 1))
    ms = [{r.batch: r.median_ms for r in rep.results} for rep in reports]
    return ModelRow(f"{name} ({dataset}), {label}", train.evaluate(model, data.test),
                    train.evaluate(binary, data.test), _weights(model, True),
                    _weights(binary, False), artifact_bytes(model), path.stat().st_size,
                    ms[0], ms[1])


def _kernel_rows(threads: int) -> list[KernelRow]:
    out_f, in_f = KERNEL_SHAPE
    torch.manual_seed(SEED)
    dense = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    layer = FrozenBinaryLinear(in_f, out_f)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.rand(out_f, in_f, generator=g) < 0.5, -1, 1))
        layer.alpha.uniform_(0.01, 0.1, generator=g)
    binary = nn.Sequential(layer).eval()
    reports = latency_ab([dense, binary], (in_f,), BATCHES, rounds=ROUNDS, repeats=REPEATS,
                         threads=threads, seed=SEED)
    return [KernelRow(a.batch, a.median_ms, b.median_ms)
            for a, b in zip(reports[0].results, reports[1].results, strict=True)]


def _models_markdown(rows: list[ModelRow]) -> str:
    headers = ["model", "fp32 acc", "binary acc", "weights fp32", "weights binary", "ratio",
               ".nnc fp32", ".nnc binary", "ratio"]
    cells = [[r.name, f"{100 * r.fp32_acc:.2f} %", f"{100 * r.binary_acc:.2f} %",
              fmt_bytes(r.fp32_weight_bytes), fmt_bytes(r.binary_weight_bytes),
              fmt_ratio(r.fp32_weight_bytes / r.binary_weight_bytes), fmt_bytes(r.fp32_file),
              fmt_bytes(r.binary_file), fmt_ratio(r.fp32_file / r.binary_file)] for r in rows]
    return render_markdown(headers, cells)


def _latency_markdown(kernel: list[KernelRow], rows: list[ModelRow]) -> str:
    headers = ["subject", "batch", "fp32 torch (ms/batch)", "binary (ms/batch)", "speed-up"]
    cells = [[f"Linear {KERNEL_SHAPE[0]}x{KERNEL_SHAPE[1]}: XNOR kernel", str(k.batch),
              fmt_ms(k.fp32_ms), fmt_ms(k.xnor_ms), fmt_ratio(k.fp32_ms / k.xnor_ms)]
             for k in kernel]
    cells += [[f"{r.name}, whole model", str(b), fmt_ms(r.fp32_ms[b]), fmt_ms(r.binary_ms[b]),
               fmt_ratio(r.fp32_ms[b] / r.binary_ms[b])] for r in rows for b in BATCHES]
    return render_markdown(headers, cells)


def _targets_markdown(kernel: list[KernelRow], rows: list[ModelRow]) -> str:
    k1 = next(k for k in kernel if k.batch == 1)
    mlp = rows[0]
    cells = [[f"{r.name}: weights >= {TARGET_WEIGHTS:g}x smaller",
              fmt_ratio(r.fp32_weight_bytes / r.binary_weight_bytes),
              _met(r.fp32_weight_bytes / r.binary_weight_bytes >= TARGET_WEIGHTS)]
             for r in rows]
    cells.append([f"XNOR kernel >= {TARGET_KERNEL:g}x faster than fp32, 1024x1024, batch 1",
                  fmt_ratio(k1.fp32_ms / k1.xnor_ms), _met(k1.fp32_ms / k1.xnor_ms
                                                           >= TARGET_KERNEL)])
    cells.append([f"{mlp.name}: binarized faster than fp32 at batch 1",
                  fmt_ratio(mlp.fp32_ms[1] / mlp.binary_ms[1]),
                  _met(mlp.binary_ms[1] < mlp.fp32_ms[1])])
    return render_markdown(["target", "measured", "met"], cells)


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def section(out_dir: Path | None = None, echo: Callable[[str], None] | None = None,
            threads: int = THREADS) -> str:
    """The markdown section (``out_dir``: where the binarized ``.nnc`` files are kept; a
    temporary directory when None; ``threads``: torch intra-op threads while timing)."""
    say = echo or (lambda _msg: None)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(out_dir) if out_dir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        rows = [_model_row(*spec, where, say, threads) for spec in MODELS]
    say("  XNOR kernel vs fp32 Linear")
    kernel = _kernel_rows(threads)
    return "\n".join([
        "## Binarization (BNN, Courbariaux/Hubara et al. 2016; XNOR-Net, Rastegari et al. "
        "2016)",
        "",
        "The packaged `binarize` recipe (every Linear/Conv binarized, first and last "
        "included; the first layer's input stays real; per-channel scaling; learned input "
        "thresholds; trained with the straight-through estimator, cosine learning rate), "
        "applied to the cached fp32 model, saved and re-loaded; the last row binarizes "
        "weights only (inputs stay real, no XNOR kernel). Weights: bytes of the weight "
        "matrices / kernels (fp32 dense vs what the container stores: 1 bit per binary "
        "weight); .nnc: the whole file (biases, scales and thresholds stay float32). "
        "Accuracy on the test split.",
        "",
        _models_markdown(rows),
        "",
        f"Latency: `measure.latency_ab`, {ROUNDS} interleaved rounds, {REPEATS} calls, "
        f"median, {threads} thread(s) for torch (the XNOR kernel runs on one), "
        f"popcount path: {xnor.kernel_status()}. The kernel row times a random "
        f"{KERNEL_SHAPE[0]}x{KERNEL_SHAPE[1]} layer with binary inputs; whole-model rows "
        "time the re-loaded model on real test samples.",
        "",
        _latency_markdown(kernel, rows),
        "",
        "### Targets (issue 9, binarization)",
        "",
        _targets_markdown(kernel, rows),
        "",
    ])


if __name__ == "__main__":
    print(section(echo=lambda msg: print(msg, file=sys.stderr, flush=True)))
