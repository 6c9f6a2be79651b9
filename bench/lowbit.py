"""Bench section: low-bit weights and activations (2, 3, 4 bits), linear (LSQ) vs power-of-two,
on every reference model, and Deep Compression + low-bit codes on LeNet-300-100.

Each model starts from its cached trained fp32 weights; the ``lowbit`` technique
(Hubara et al. 2017; LSQ, Esser et al. 2020; log: Miyashita, Lee & Murmann 2016) quantizes
its Linear / Conv layers -- weights and inputs at the same bits, the first and last layer
at 8 bits -- and the weight matrices of GRU / LSTM layers (for gru / lstm every matrix and
the classifier at the row's bits; the recurrent layers' inputs and state stay float) -- with
a short fake-quantized fine-tuning (:data:`EPOCHS` epoch on :data:`TRAIN_SAMPLES` training
samples, seed :data:`SEED`), then freezes it to int8 codes. Accuracy is on the test split;
bytes are the ``.nnc`` file; ratio = fp32 ``torch.save`` bytes / ``.nnc`` bytes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset
from nncompress.measure import accuracy, artifact_bytes, torch_save_bytes
from nncompress.quant.lowbit import LowBitConfig, lowbit
from nncompress.report import fmt_bytes, fmt_pct, fmt_ratio, render_markdown
from nncompress.technique import Context

SEED = 0
MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"), ("cnn2d", "digits"),
          ("rescnn", "mnist1d"), ("transformer", "mnist1d"), ("gru", "mnist1d"),
          ("lstm", "mnist1d"))
BITS = (2, 3, 4)
QUANTIZERS = ("linear", "log")
EPOCHS = 1
TRAIN_SAMPLES = 1024
LR = 5e-4
#: models whose first and last layers are recurrent + one classifier: all at the row's bits
CLASSIFIER_ONLY = ("gru", "lstm")
DC_RECIPE = "deep-compression-lowbit"
DC_TARGET_RATIO, DC_MAX_DROP = 100.0, 0.005


@dataclass(frozen=True)
class LowBitRow:
    model: str
    quantizer: str
    bits: int
    accuracy: float
    accuracy_delta: float
    file_bytes: int
    ratio: float
    seconds: float


@dataclass(frozen=True)
class DCRow:
    accuracy: float
    accuracy_delta: float
    file_bytes: int
    ratio: float
    seconds: float
    bytes_table: str


def train_subset(data: Dataset, count: int = TRAIN_SAMPLES, seed: int = SEED) -> Dataset:
    """``data`` with its training split cut to ``count`` seeded random samples."""
    dataset = data.train.dataset
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Subset(dataset, picked[:count].tolist()),
                        batch_size=data.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return Dataset(data.name, loader, data.test, data.input_shape, data.num_classes)


def run_one(name: str, model: torch.nn.Module, data: Dataset, short: Dataset, quantizer: str,
            bits: int, base: float) -> tuple[LowBitRow, list[str]]:
    """One configuration (``base``: the fp32 test accuracy): (its row, the run's log)."""
    keep = name not in CLASSIFIER_ONLY
    config = LowBitConfig(weight_bits=bits, activation_bits=bits, quantizer=quantizer,
                          keep_first=keep, keep_last=keep, epochs=EPOCHS, lr=LR, seed=SEED)
    ctx = Context(short, seed=SEED, progress=False)
    start = time.perf_counter()
    out = lowbit(copy.deepcopy(model), config, ctx)
    seconds = time.perf_counter() - start
    acc, size = accuracy(out, data.test), artifact_bytes(out)
    return LowBitRow(name, quantizer, bits, acc, acc - base, size,
                     torch_save_bytes(model) / size, seconds), ctx.log


def bench_models(models: Sequence[tuple[str, str]] = MODELS, bits: Sequence[int] = BITS,
                 echo: Callable[[str], None] | None = None
                 ) -> tuple[list[LowBitRow], dict[str, list[str]], dict[str, float]]:
    """Every (model, quantizer, bits): rows, what stayed float per model, fp32 accuracy."""
    rows: list[LowBitRow] = []
    floats: dict[str, list[str]] = {}
    base: dict[str, float] = {}
    for name, dataset in models:
        model, data = zoo.load(name, dataset, seed=SEED, progress=False)
        base[name] = accuracy(model, data.test)
        short = train_subset(data)
        for quantizer in QUANTIZERS:
            for b in bits:
                row, log = run_one(name, model, data, short, quantizer, b, base[name])
                rows.append(row)
                floats[name] = [line.removeprefix("lowbit: ") for line in log
                                if "stays float" in line]
                if echo is not None:
                    echo(f"  lowbit: {name} {quantizer} {b} bits: "
                         f"{100 * row.accuracy:.2f} % in {row.seconds:.0f} s")
    return rows, floats, base


def bench_deep_compression(echo: Callable[[str], None] | None = None) -> DCRow:
    """The ``deep-compression-lowbit`` recipe on LeNet-300-100 (digits), full schedule."""
    model, data = zoo.load("mlp", "digits", seed=SEED, progress=False)
    start = time.perf_counter()
    result = nc.compress(model, DC_RECIPE, data, seed=SEED, progress=False,
                         measure_latency=False)
    seconds = time.perf_counter() - start
    acc, size = accuracy(result.model, data.test), artifact_bytes(result.model)
    if echo is not None:
        echo(f"  lowbit: {DC_RECIPE} on mlp: {100 * acc:.2f} %, {size} B in {seconds:.0f} s")
    return DCRow(acc, acc - accuracy(model, data.test), size,
                 torch_save_bytes(model) / size, seconds,
                 result.bytes_table(markdown=True))


def models_markdown(rows: Sequence[LowBitRow], base: dict[str, float]) -> str:
    headers = ["model", "fp32 acc.", "bits (W = A)", "linear acc.", "Δ", "log acc.", "Δ",
               "linear .nnc", "ratio", "log .nnc", "ratio"]
    found = {(r.model, r.quantizer, r.bits): r for r in rows}
    cells = []
    for name in dict.fromkeys(r.model for r in rows):
        for b in sorted({r.bits for r in rows if r.model == name}):
            lin, log = found[(name, "linear", b)], found[(name, "log", b)]
            cells.append([name, fmt_pct(base[name]), str(b), fmt_pct(lin.accuracy),
                          fmt_pct(lin.accuracy_delta, signed=True), fmt_pct(log.accuracy),
                          fmt_pct(log.accuracy_delta, signed=True), fmt_bytes(lin.file_bytes),
                          fmt_ratio(lin.ratio), fmt_bytes(log.file_bytes),
                          fmt_ratio(log.ratio)])
    return render_markdown(headers, cells)


def miyashita_line(rows: Sequence[LowBitRow], bits: int = 3) -> str:
    """Whether power-of-two levels beat uniform ones at ``bits`` bits, model by model."""
    found = {(r.model, r.quantizer): r.accuracy for r in rows if r.bits == bits}
    names = [m for m, q in found if q == "linear" and (m, "log") in found]
    ahead = [m for m in names if found[(m, "log")] > found[(m, "linear")]]
    tied = [m for m in names if found[(m, "log")] == found[(m, "linear")]]
    verdict = "holds" if len(ahead) > len(names) / 2 else "does not hold"
    return (f"Miyashita et al. (2016) report log ahead of linear at {bits} bits: here log is "
            f"ahead on {len(ahead)} of {len(names)} models ({', '.join(ahead) or 'none'}; "
            f"tied: {', '.join(tied) or 'none'}), so the claim {verdict} with LSQ-trained "
            f"uniform steps and this short fine-tuning.")


def dc_markdown(dc: DCRow) -> str:
    met = dc.ratio >= DC_TARGET_RATIO and -dc.accuracy_delta <= DC_MAX_DROP
    table = render_markdown(
        ["recipe", "accuracy", "Δ", ".nnc bytes", "ratio vs fp32 torch.save", "time",
         f"target (>= {DC_TARGET_RATIO:.0f}x, <= 0.5 pt)"],
        [[DC_RECIPE, fmt_pct(dc.accuracy), fmt_pct(dc.accuracy_delta, signed=True),
          fmt_bytes(dc.file_bytes), fmt_ratio(dc.ratio), f"{dc.seconds:.0f} s",
          "met" if met else "NOT met"]])
    return "\n".join([table, "", dc.bytes_table])


def section(out_dir: Path | None = None, *, models: Sequence[tuple[str, str]] = MODELS,
            echo: Callable[[str], None] | None = None) -> str:
    """The markdown section; ``out_dir``: where ``lowbit.json`` (the rows) goes, if given."""
    start = time.perf_counter()
    rows, floats, base = bench_models(models, echo=echo)
    dc = bench_deep_compression(echo)
    notes = [f"- {name}: " + "; ".join(lines) for name, lines in floats.items() if lines]
    parts = [
        "## Low-bit weights and activations (issue 9)", "", __doc__.split("\n\n", 1)[1], "",
        models_markdown(rows, base), "", miyashita_line(rows), "",
        "What stayed float (named by the technique's log):", "", *notes, "",
        "### Deep Compression + low-bit codes (LeNet-300-100, digits)", "",
        f"Recipe `{DC_RECIPE}`: sparse VD, BN folding, dead units, then 5-bit LSQ codes for "
        "every layer (5 epochs); the container stores the pruned codes as relative "
        "indices / Huffman.", "", dc_markdown(dc), "",
        f"Section run time: {time.perf_counter() - start:.0f} s.",
    ]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        payload = {"rows": [asdict(r) for r in rows],
                   "deep_compression": {k: v for k, v in asdict(dc).items()
                                        if k != "bytes_table"}}
        (Path(out_dir) / "lowbit.json").write_text(json.dumps(payload, indent=1))
    return "\n".join(parts)


if __name__ == "__main__":
    print(section(echo=print))
