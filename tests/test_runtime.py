"""``nc.runtime.load``: one ``predict`` over ONNX Runtime, the compiled C export and a
``.nnc`` file; repeated calls of varying batch give the plain session's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nncompress as nc
from nncompress import models, runtime
from nncompress.errors import DataError, NNCError


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 23), 3, channels=[4, 5, 6]).eval()
    nc.export(model, tmp_path / "m.onnx", torch.randn(2, 1, 23))
    return tmp_path / "m.onnx"


def test_repeated_calls_equal_the_plain_session(onnx_file: Path) -> None:
    import onnxruntime as ort

    deployed = runtime.load(onnx_file)
    plain = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    for batch in (1, 1, 5, 1, 5, 3):
        x = g.normal(size=(batch, 1, 23)).astype(np.float32)
        got = deployed.predict(x)
        want = plain.run(None, {plain.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert got.shape == (batch, 3) and got.dtype == np.float32
    first, second = deployed.predict(x), deployed.predict(x)
    assert first is not second and first.ctypes.data != second.ctypes.data   # no aliasing


def test_torch_tensors_and_nnc_files(onnx_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 5, 7), 3, hidden=[4]).eval()
    nc.save(model, tmp_path / "m.nnc")
    x = torch.randn(3, 1, 5, 7)
    deployed = runtime.load(tmp_path / "m.nnc")
    assert deployed.form == "torch"
    with torch.no_grad():
        np.testing.assert_allclose(deployed.predict(x), model(x).numpy(), rtol=1e-6)
    assert runtime.load(onnx_file).predict(torch.zeros(2, 1, 23)).shape == (2, 3)


@pytest.mark.parametrize("name, content, message", [
    ("missing.onnx", None, "not found"),
    ("bad.onnx", b"not onnx at all", "not a loadable ONNX model"),
    ("model.txt", b"x", "not a deployable form"),
])
def test_bad_paths(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(NNCError, match=message):
        runtime.load(tmp_path / name)


def test_a_folder_without_an_export(tmp_path: Path) -> None:
    with pytest.raises(NNCError, match=r"model\.c"):
        runtime.load(tmp_path)
    (tmp_path / "model.c").write_text("int x;\n")
    (tmp_path / "model.h").write_text("/* nothing */\n")
    with pytest.raises(NNCError, match="not a header written by nncompress"):
        runtime.load(tmp_path)


def test_wrong_shapes_and_counts(onnx_file: Path) -> None:
    deployed = runtime.load(onnx_file)
    with pytest.raises(DataError, match=r"expected \[batch, 1, 23\], got \[2, 1, 22\]"):
        deployed.predict(np.zeros((2, 1, 22), np.float32))
    with pytest.raises(DataError, match="takes 1 input"):
        deployed.predict((np.zeros((2, 1, 23)), np.zeros((2, 1, 23))))
    with pytest.raises(NNCError, match="threads"):
        runtime.load(onnx_file, threads=0)
