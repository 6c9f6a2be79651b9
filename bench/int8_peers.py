"""The int8 peers of issue 9's targets table, each built the way its documentation shows.

Integer-arithmetic-only int8 inference is Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018); the peers
below are the tools a user reaches for instead of ours:

- fp32 eager torch (the user's own model; ``torch.save(state_dict)`` bytes);
- ONNX Runtime fp32 (``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter);
- ONNX Runtime dynamic int8 (``onnxruntime.quantization.quantize_dynamic``, int8 weights,
  activations quantized per call);
- ONNX Runtime static int8 (``quantize_static``: QDQ format, per-channel int8 weights,
  int8 activations, MinMax calibration over seeded training samples);
- PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` on Linear / GRU / LSTM;
  deprecated, so it appears here as a peer only and never in ``src/``).

Both ONNX quantizers run on the model after ``quant_pre_process`` (symbolic shape
inference and graph optimisation), as ORT's documentation recommends. Every ONNX
Runtime session and every torch call uses ``THREADS`` intra-op threads. A peer that cannot
handle a model is an :class:`Artifact` with ``error`` set (its one-line reason), never a
crash. Every layer a peer leaves in float is named in the artifact's notes.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from nncompress.data import Dataset, example_input
from peers import try_peer

THREADS = 2
SEED = 0
CALIB_BATCH = 64
# ONNX operators that do the multiply-accumulate work; one left with float inputs is fp32.
_ONNX_COMPUTE = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose", "GRU", "LSTM", "RNN"})

Predict = Callable[[np.ndarray | torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class Artifact:
    """What a user of one tool ships and runs.

    ``predict``: a batch ``[B, *input_shape]`` (numpy or torch) -> logits ``[B, classes]``
    as numpy; ``file_bytes``: bytes on disk of the shipped file (.onnx, ``torch.save``,
    .nnc); ``kind``: ``"fp32"`` (eager torch baseline), ``"ort-fp32"``, ``"peer-int8"`` or
    ``"ours"``; ``error``: why the tool failed on this model (then ``predict`` is None).
    """

    name: str
    predict: Predict | None
    file_bytes: int
    notes: str = ""
    kind: str = "ours"
    error: str | None = None


def as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a batch (no copy for a contiguous CPU tensor)."""
    arr = x.detach().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(arr)


def torch_predict(model: nn.Module) -> Predict:
    """``predict`` of an eager torch model (eval mode, inference mode, numpy logits)."""

    def predict(x: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.as_tensor(x)).numpy()

    return predict


def ort_predict(path: Path, threads: int = THREADS) -> Predict:
    """``predict`` of an ONNX Runtime CPU session on ``path`` with ``threads`` intra-op
    threads (one inter-op thread, ORT's default graph optimisations)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray | torch.Tensor) -> np.ndarray:
        return session.run(None, {name: as_numpy(x)})[0]

    return predict


def calibration_samples(data: Dataset, batches: int, seed: int = SEED) -> list[np.ndarray]:
    """``batches`` batches of ``CALIB_BATCH`` training samples, chosen by a seeded
    permutation of the training set (never the test set)."""
    dataset = data.train.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    xs = [as_numpy(dataset[int(i)][0]) for i in order[:batches * CALIB_BATCH]]
    return [np.stack(xs[k:k + CALIB_BATCH]) for k in range(0, len(xs), CALIB_BATCH)]


class _Reader(CalibrationDataReader):
    """ORT's calibration interface over fixed batches for the input ``name``."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._feeds = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def onnx_float_ops(path: Path) -> str:
    """The compute operators of an ONNX file left in float: a Gemm / MatMul / Conv / RNN
    whose first two inputs are not both dequantized (``DequantizeLinear``); quantized
    dynamic operators have other op types (MatMulInteger, ConvInteger, ...)."""
    graph = onnx.load(str(path)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    left = Counter(node.op_type for node in graph.node if node.op_type in _ONNX_COMPUTE
                   and not all(producer.get(i) == "DequantizeLinear" for i in node.input[:2]))
    return _left_in_fp32(left, "Gemm / MatMul / Conv / RNN operator")


def torch_float_layers(model: nn.Module) -> str:
    """Layers of a torch model that still hold a float weight matrix / kernel."""
    left = Counter(type(m).__name__ for m in model.modules()
                   if isinstance(getattr(m, "weight", None), nn.Parameter)
                   and m.weight.dim() >= 2 and m.weight.is_floating_point())
    return _left_in_fp32(left, "layer with a weight")


def _left_in_fp32(counts: Counter[str], what: str) -> str:
    if not counts:
        return f"no {what} left in fp32"
    return "left in fp32: " + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' deprecation and 'consider pre-processing' chatter."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _export(model: nn.Module, data: Dataset, path: Path) -> Path:
    """fp32 ONNX through the TorchScript exporter, batch axis dynamic."""
    torch.onnx.export(model, example_input(data, 1), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      dynamo=False)
    return path


def _preprocess(src: Path, dst: Path) -> tuple[Path, str]:
    """ORT's recommended pre-processing; the raw export (and a note) if it fails."""
    got, err = try_peer(lambda: quant_pre_process(str(src), str(dst)) or dst)
    return (dst, "") if got is not None else (src, f"pre-processing failed ({err}); ")


def _ort_fp32(model: nn.Module, data: Dataset, out: Path, threads: int) -> Artifact:
    path = _export(model, data, out)
    predict = ort_predict(path, threads)
    x = example_input(data, 8)
    with torch.inference_mode():
        diff = float(np.abs(predict(x) - model(x).numpy()).max())
    return Artifact("ONNX Runtime fp32", predict, path.stat().st_size,
                    f"TorchScript export; max abs logit diff vs eager {diff:.1e}", "ort-fp32")


def _ort_dynamic(pre: Path, note: str, out: Path, threads: int) -> Artifact:
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    return Artifact("ONNX Runtime dynamic int8", ort_predict(out, threads), out.stat().st_size,
                    note + "int8 weights, activations quantized per call; "
                    + onnx_float_ops(out), "peer-int8")


def _ort_static(pre: Path, note: str, out: Path, calib: list[np.ndarray],
                threads: int) -> Artifact:
    quantize_static(str(pre), str(out), _Reader("x", calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    samples = sum(len(b) for b in calib)
    return Artifact("ONNX Runtime static int8 (QDQ)", ort_predict(out, threads),
                    out.stat().st_size,
                    note + f"per-channel S8S8, MinMax over {samples} train samples; "
                    + onnx_float_ops(out), "peer-int8")


def _torch_dynamic(model: nn.Module, out: Path) -> Artifact:
    quantized = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {nn.Linear, nn.GRU, nn.LSTM}, dtype=torch.qint8)
    quantized.eval()
    torch.save(quantized.state_dict(), out)
    return Artifact("PyTorch dynamic int8", torch_predict(quantized), out.stat().st_size,
                    "torch.ao quantize_dynamic on Linear/GRU/LSTM; "
                    + torch_float_layers(quantized), "peer-int8")


def _attempt(name: str, kind: str, build: Callable[[], Artifact]) -> Artifact:
    """``build()``, or a failed artifact carrying the one-line reason."""
    with _quiet():
        got, err = try_peer(build)
    return got if got is not None else Artifact(name, None, 0, kind=kind, error=err)


def peer_artifacts(name: str, model: nn.Module, data: Dataset, calib_batches: int = 4, *,
                   out_dir: Path | None = None, seed: int = SEED,
                   threads: int = THREADS) -> list[Artifact]:
    """The fp32 baselines and the three int8 peers of ``model`` (reference model ``name``),
    files written under ``out_dir`` (a temporary directory when None: the sessions hold
    their models in memory, so the files may go). ``calib_batches`` batches of
    ``CALIB_BATCH`` seeded training samples calibrate the static quantizer; ONNX Runtime
    sessions get ``threads`` intra-op threads."""
    torch.manual_seed(seed)
    fp32 = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory(prefix="nnc-int8-") as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        torch.save(fp32.state_dict(), root / f"{name}.fp32.pt")
        arts = [Artifact("fp32 eager torch", torch_predict(fp32),
                         (root / f"{name}.fp32.pt").stat().st_size, "torch.save(state_dict)",
                         "fp32")]
        ort32 = _attempt("ONNX Runtime fp32", "ort-fp32",
                         lambda: _ort_fp32(fp32, data, root / f"{name}.onnx", threads))
        arts.append(ort32)
        calib = calibration_samples(data, calib_batches, seed)
        peers: list[tuple[str, Callable[[Path, str], Artifact]]] = [
            ("ONNX Runtime dynamic int8",
             lambda pre, note: _ort_dynamic(pre, note, root / f"{name}.dyn.onnx", threads)),
            ("ONNX Runtime static int8 (QDQ)",
             lambda pre, note: _ort_static(pre, note, root / f"{name}.qdq.onnx", calib,
                                           threads)),
        ]
        if ort32.error is None:
            with _quiet():
                pre, note = _preprocess(root / f"{name}.onnx", root / f"{name}.pre.onnx")
        for label, run in peers:
            if ort32.error is not None:
                arts.append(Artifact(label, None, 0, kind="peer-int8",
                                     error=f"ONNX export failed: {ort32.error}"))
            else:
                arts.append(_attempt(label, "peer-int8",
                                     lambda run=run: run(pre, note)))  # type: ignore[misc]
        arts.append(_attempt("PyTorch dynamic int8", "peer-int8",
                             lambda: _torch_dynamic(fp32, root / f"{name}.dyn.pt")))
    return arts
