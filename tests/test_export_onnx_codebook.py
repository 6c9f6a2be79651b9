"""The codebook post-pass of the float ONNX exporter (:mod:`nncompress.export.onnx_codebook`):
float initializers with <= 256 distinct values become ``Gather(codebook, Cast(uint8
indices))`` where smaller; the values, and so ONNX Runtime's outputs, are bit-identical, and
ONNX Runtime folds the Gather away when it creates a session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from nncompress import models
from nncompress.export import export_bytes
from nncompress.export.onnx_codebook import MAX_VALUES, codebook_pass, codebook_tensor
from nncompress.export.onnx_int8 import run_onnx
from nncompress.export.onnx_torch import module_to_onnx
from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm
from nncompress.share.weight_sharing import WeightSharingConfig, weight_sharing
from nncompress.technique import Context
from test_export_onnx_forms import _data


def _shared_cnn() -> tuple[nn.Module, torch.Tensor]:
    """A 1-D CNN, BatchNorm folded first (as the deep-compression recipe does: the
    exporter would otherwise fold it into the shared weights), whose conv and linear
    weights then hold 32 shared values each (5 bits)."""
    shape = (1, 40)
    torch.manual_seed(0)
    model = models.build("cnn1d", shape, 3, channels=[8, 16, 16])
    ctx = Context(data=_data(shape), progress=False)
    model = fold_batchnorm(model, FoldBatchNormConfig(), ctx)
    model = weight_sharing(model, WeightSharingConfig(bits=5, epochs=0), ctx).eval()
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
    return model, x


def test_codebook_tensor_round_trips_bit_patterns() -> None:
    values = np.array([0.5, -0.0, 0.0, np.nan, -1.25, 0.5, 0.0], dtype=np.float32)
    values = np.tile(values, (3, 1))
    found = codebook_tensor(values)
    assert found is not None
    book, idx = found
    assert idx.dtype == np.uint8 and idx.shape == values.shape
    assert len(book) == 5                         # -0.0 and +0.0 kept apart
    assert np.array_equal(book[idx].view(np.uint32), values.view(np.uint32))
    many = np.arange(MAX_VALUES + 1, dtype=np.float32)
    assert codebook_tensor(many) is None
    assert codebook_tensor(many[:MAX_VALUES]) is not None
    assert codebook_tensor(np.zeros(4, dtype=np.float64)) is None


def test_weight_shared_model_is_smaller_and_bit_identical() -> None:
    model, x = _shared_cnn()
    plain = module_to_onnx(model, (x,))
    packed, report = codebook_pass(onnx.load_from_string(plain))
    onnx.checker.check_model(packed, full_check=True)
    # conv1 (40 weights) and the classifier (48) are too small to gain
    assert set(report.names) == {"features.conv2.weight", "features.conv3.weight"}
    assert report.bytes_after < report.bytes_before / 2
    assert packed.ByteSize() < len(plain) * 0.6
    kinds = [n.op_type for n in packed.graph.node]
    assert kinds.count("Gather") == len(report.names) == kinds.count("Cast")
    for got, want in zip(run_onnx(packed, x), run_onnx(plain, x), strict=True):
        assert np.array_equal(got, want)          # bit for bit, not merely close
    result = export_bytes(model, x)               # applied by default, and said so
    assert result.data == packed.SerializeToString()
    note = [n for n in result.notes if "codebook + uint8 indices" in n]
    assert len(note) == 1 and note[0].startswith(f"{len(report.names)} tensor(s)")
    assert "KiB instead of" in note[0]


def test_dense_model_is_untouched() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=[16, 8]).eval()
    x = torch.randn(4, 1, 12)
    plain = module_to_onnx(model, (x,))
    packed, report = codebook_pass(onnx.load_from_string(plain))
    assert report.names == () and report.note() is None
    assert packed.SerializeToString() == plain
    result = export_bytes(model, x)
    assert result.data == plain
    assert not any("codebook" in n for n in result.notes)


def test_a_tensor_is_left_dense_where_the_codebook_form_is_not_smaller() -> None:
    layer = nn.Linear(2, 2).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # 2 values, 4 weights
    plain = module_to_onnx(layer, (torch.randn(1, 2),))
    _, report = codebook_pass(onnx.load_from_string(plain))
    assert report.names == ()


def test_onnx_runtime_folds_the_gather_at_session_creation(tmp_path: Path) -> None:
    model, x = _shared_cnn()
    packed, report = codebook_pass(onnx.load_from_string(module_to_onnx(model, (x,))))
    assert report.names
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(packed.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    kinds = {n.op_type for n in optimized.graph.node}
    assert not kinds & {"Gather", "Cast"}, kinds
    dense = {t.name for t in optimized.graph.initializer}
    assert set(report.names) <= dense              # the weights are dense constants again


@pytest.mark.parametrize("bits", [1, 8])
def test_weight_sharing_at_the_extreme_widths(bits: int) -> None:
    model, x = _shared_cnn()
    model = weight_sharing(model, WeightSharingConfig(bits=bits, epochs=0),
                           Context(data=_data((1, 40)), progress=False)).eval()
    plain = module_to_onnx(model, (x,))
    packed, report = codebook_pass(onnx.load_from_string(plain))
    assert report.names
    for got, want in zip(run_onnx(packed, x), run_onnx(plain, x), strict=True):
        assert np.array_equal(got, want)
