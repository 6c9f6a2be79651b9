"""Bench section: the Deep Compression pipeline (prune -> weight sharing -> packed /
Huffman-coded container) against what peer tools' users get on disk, in one run.

Peers, each the way its documentation shows: ``torch.nn.utils.prune`` (90 % global L1,
``prune.remove``, ``torch.save``), PyTorch dynamic int8 quantization
(``torch.ao.quantization.quantize_dynamic`` on Linear layers, ``torch.save``) and ONNX
Runtime int8 (``torch.onnx.export`` then ``onnxruntime.quantization.quantize_dynamic``,
the .onnx file). Bytes are the file on disk; ratio = fp32 ``torch.save`` bytes / bytes.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nncompress as nc
from nncompress import models as zoo
from nncompress.data import Dataset, example_input
from nncompress.formats.huffman import entropy_report
from nncompress.measure import accuracy, torch_save_bytes
from nncompress.report import fmt_bytes, fmt_pct, fmt_ratio, render_markdown
from peers import try_peer

SEED = 0
MODELS = (("mlp", "digits"), ("cnn1d", "mnist1d"), ("gru", "mnist1d"), ("lstm", "mnist1d"))


@dataclass(frozen=True)
class SizeRow:
    model: str
    tool: str
    accuracy: float | None
    accuracy_delta: float | None
    file_bytes: int | None
    ratio: float | None
    note: str = ""


def _bytes_of_state(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def _ours(model: nn.Module, data: Dataset, tmp: Path,
          tables: list[str]) -> tuple[float, int, str]:
    result = nc.compress(model, "deep-compression", data, seed=SEED, progress=False,
                         measure_latency=False)
    tables.append(result.bytes_table(markdown=True))
    path = tmp / "dc.nnc"
    size = nc.save(result.model, path)
    loaded = nc.load(path)
    worst = _worst_huffman_excess(loaded)
    return accuracy(loaded, data.test), size, worst


def _worst_huffman_excess(model: nn.Module) -> str:
    """The Huffman index/value streams of the weight matrices vs their empirical entropy
    (streams under 1 bit/symbol of entropy are skipped: no prefix code goes below 1 bit)."""
    excess = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or p.numel() < 256:
            continue
        for s in entropy_report(p.detach()).streams:
            if s.name in ("indices", "values") and s.entropy_bits >= 1.0:
                extra = (s.huffman_bits - s.entropy_bits) * s.symbols / 8
                excess.append((s.excess, f"{name}/{s.name}", extra, s.symbols))
    if not excess:
        return ""
    within = sum(e <= 0.02 for e, *_ in excess)
    worst = max(excess)
    return (f"Huffman streams within {100 * worst[0]:.2f} % of their entropy; "
            f"{within} of {len(excess)} within 2 % (worst: {worst[1]}, {worst[3]} symbols, "
            f"{worst[2]:.0f} B above its entropy)")


def _torch_dynamic_int8(model: nn.Module, data: Dataset, _tmp: Path) -> tuple[float, int, str]:
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return accuracy(q, data.test), _bytes_of_state(q), "Linear layers only"


def _ort_int8(model: nn.Module, data: Dataset, tmp: Path) -> tuple[float, int, str]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = tmp / "m.onnx", tmp / "m.int8.onnx"
    torch.onnx.export(model.eval(), example_input(data, 1), str(fp32), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    correct = seen = 0
    for x, y in data.test:
        out = session.run(None, {"x": x.numpy()})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
        seen += len(y)
    return correct / seen, os.path.getsize(int8), ""


def bench_sharing(run_torch_prune: Callable[[nn.Module, Dataset, float], tuple[nn.Module, int]],
                  echo: Callable[[str], None]) -> tuple[list[SizeRow], list[str]]:
    """Rows of the size table, and the per-stage bytes table of each of our runs."""
    warnings.filterwarnings("ignore")
    rows: list[SizeRow] = []
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, dataset in MODELS:
            model, data = zoo.load(name, dataset, seed=SEED, progress=False)
            base_acc, base_bytes = accuracy(model, data.test), torch_save_bytes(model)
            rows.append(SizeRow(name, "baseline fp32 (torch.save)", base_acc, 0.0, base_bytes,
                                1.0))

            def prune90(m: nn.Module, d: Dataset, _t: Path) -> tuple[float, int, str]:
                pruned, size = run_torch_prune(m, d, 0.9)
                return accuracy(pruned, d.test), size, "90 % global L1, masks removed"

            def ours(m: nn.Module, d: Dataset, t: Path) -> tuple[float, int, str]:
                return _ours(m, d, t, tables)

            tools = (("nncompress deep-compression (.nnc)", ours),
                     ("torch.nn.utils.prune + torch.save", prune90),
                     ("PyTorch dynamic int8 + torch.save", _torch_dynamic_int8),
                     ("ONNX Runtime dynamic int8 (.onnx)", _ort_int8))
            for tool, run in tools:
                echo(f"  {name} {tool}")
                got, err = try_peer(lambda run=run, m=model, d=data: run(m, d, tmp))
                if got is None:
                    rows.append(SizeRow(name, tool, None, None, None, None, f"failed: {err}"))
                    continue
                acc, size, note = got
                rows.append(SizeRow(name, tool, acc, acc - base_acc, size, base_bytes / size,
                                    note))
    return rows, tables


SHARING_INTRO = """## Deep Compression vs peers: bytes on disk

`deep-compression` recipe, the same on every model (sparse variational dropout as the
pruning step -- on GRU / LSTM weights per Lobacheva et al. 2017 --, BatchNorm folding,
5-bit k-means weight sharing with near-zero centroids made exact zeros and centroid
fine-tuning, dead units removed); the `.nnc` writer then stores each tensor in its
smallest lossless encoding (codebook + Huffman-coded indices, relative-index sparse
positions) under a compact binary header. Targets: mlp ≥ 80x with ≤ 0.5 pt drop, cnn1d
≥ 25x with ≤ 1 pt drop, gru ≥ 10x with ≤ 1 pt drop."""


def sharing_markdown(rows: list[SizeRow]) -> str:
    headers = ["model", "tool", "accuracy", "Δ accuracy", "bytes on disk", "ratio vs fp32",
               "note"]
    cells = [[r.model, r.tool, fmt_pct(r.accuracy), fmt_pct(r.accuracy_delta, signed=True),
              fmt_bytes(r.file_bytes), fmt_ratio(r.ratio), r.note] for r in rows]
    return render_markdown(headers, cells)
