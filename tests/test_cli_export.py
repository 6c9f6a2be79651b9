"""``nncompress export MODEL.nnc --format onnx [--out F]``: int8 models as exact integer
ONNX, others as float ONNX; one-line errors and exit 2 on bad input; nothing written
unless the export succeeds (a corrupt file is refused before anything is written)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from nncompress import api, cli
from nncompress.export.onnx_int8 import run_onnx
from nncompress.models.mlp import MLP
from nncompress.quant.convert import convert
from nncompress.quant.int8 import Int8Model
from nncompress.quant.reference import run


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder (the cwd) with a float MLP, an int8 MLP that records its input shape and
    one that records none."""
    torch.manual_seed(0)
    model = MLP((1, 16), 3, hidden=(9,)).eval()
    api.save(model, tmp_path / "float.nnc")
    g = torch.Generator().manual_seed(1)
    program, _ = convert(model, [torch.randn(32, 1, 16, generator=g)])
    api.save(Int8Model.from_program(program), tmp_path / "int8.nnc",
             meta={"input_shape": [1, 16]})
    api.save(Int8Model.from_program(program), tmp_path / "bare.nnc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def onnx_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".onnx" in p.name or ".tmp" in p.name)


def test_int8_model_exports_bit_exact(work: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "int8.nnc", "--format", "onnx")
    assert code == 0, err
    assert "onnx:program" in out and "bit for bit" in out
    x = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(2))
    program = api.load(work / "int8.nnc").current_program()
    got = run_onnx((work / "int8.onnx").read_bytes(), x)[0]
    np.testing.assert_array_equal(got, run(program, x)[0].numpy())
    mode = stat.S_IMODE(os.stat(work / "int8.onnx").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask          # like any file the user creates, not 0600


def test_float_model_exports_through_torch(work: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "float.nnc", "--out", "f.onnx")
    assert code == 0, err
    assert "onnx:module" in out and "max |diff|" in out
    x = torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = api.load(work / "float.nnc")(x).numpy()
    np.testing.assert_allclose(run_onnx((work / "f.onnx").read_bytes(), x)[0], want,
                               atol=1e-5)


def test_input_shape_option(work: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "bare.nnc", "--input-shape", "1,16")
    assert code == 0, err
    assert "shaped [1, 16] (--input-shape)" in out
    assert onnx_files(work) == ["bare.onnx"]


def test_export_replaces_an_existing_output_whole(work: Path, capsys) -> None:
    (work / "int8.onnx").write_bytes(b"old")
    code, _, err = run_cli(capsys, "int8.nnc")
    assert code == 0, err
    assert (work / "int8.onnx").read_bytes()[:3] != b"old"
    assert onnx_files(work) == ["int8.onnx"]


@pytest.mark.parametrize("argv, message", [
    (("bare.nnc",), "records no input shape or dataset; give --input-shape"),
    (("int8.nnc", "--format", "tflite"), "--format 'tflite': unknown; known: c, onnx"),
    (("int8.nnc", "--input-shape", "1,0"), "--input-shape '1,0'"),
    (("int8.nnc", "--out", "int8.nnc"), "is the model file itself"),
    (("int8.nnc", "--out", "missing/x.onnx"), "output folder 'missing' does not exist"),
    (("model.pt",), "does not load .pt files"),
    (("nothere.nnc",), "does not exist"),
    (("bare.nnc", "--input-shape", "1,17"), "fails on the example input shaped [(2, 1, 17)]"),
])
def test_bad_input_one_line_exit_2_nothing_written(work: Path, capsys, argv, message) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert onnx_files(work) == [] and not (work / "missing").exists()


def test_corrupt_file_refused_before_anything_is_written(work: Path, capsys) -> None:
    data = (work / "int8.nnc").read_bytes()
    (work / "cut.nnc").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (work / "flip.nnc").write_bytes(bytes(flipped))
    for name in ("cut.nnc", "flip.nnc"):
        code, _, err = run_cli(capsys, name)
        assert code == 2 and err.startswith("nncompress: error:") and err.count("\n") == 1
    assert onnx_files(work) == []


# ----------------------------------------------------------------------------- C + run


@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="needs gcc")
def test_c_export_and_run(work: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "int8.nnc", "--format", "c")
    assert code == 0
    assert sorted(p.name for p in (work / "int8_c").iterdir()) == ["model.c", "model.h"]
    assert "flash: " in out and "RAM: " in out and "bit for bit" in out
    x = np.random.default_rng(0).normal(size=(6, 1, 16)).astype(np.float32)
    np.save(work / "x.npy", x)
    assert cli.main(["run", "int8_c", "--input", "x.npy", "--out", "y.npy"]) == 0
    out, _ = capsys.readouterr()
    assert "output: [6, 3] float32 (c)" in out
    from nncompress.export import program_of

    program = program_of(api.load(work / "int8.nnc"))
    np.testing.assert_array_equal(np.load(work / "y.npy"),
                                  run(program, torch.from_numpy(x))[0].numpy())


@pytest.mark.parametrize("argv, message", [
    (["float.nnc", "--format", "c", "--input-shape", "1,16"], "float model needs --data"),
    (["int8.nnc", "--format", "c", "--out", "float.nnc"], "exists and is not a folder"),
])
def test_c_export_refusals_write_nothing(work: Path, capsys, argv, message) -> None:
    before = sorted(p.name for p in work.iterdir())
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == before


def test_corrupt_file_c_export_writes_nothing(work: Path, capsys) -> None:
    (work / "bad.nnc").write_bytes(b"NNC\x00" + b"\x01" * 40)
    code, _, err = run_cli(capsys, "bad.nnc", "--format", "c")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (work / "bad_c").exists()


@pytest.mark.parametrize("setup, argv, message", [
    (None, ["run", "int8.nnc", "--input", "missing.npy"], "--input 'missing.npy': not found"),
    ("text", ["run", "int8.nnc", "--input", "x.npy"], "not a readable .npy"),
    ("pickle", ["run", "int8.nnc", "--input", "x.npy"], "not a readable .npy"),
    ("wrong", ["run", "m.onnx", "--input", "x.npy"], "input 0: expected [batch, 1, 16]"),
    (None, ["run", "nothing.onnx", "--input", "x.npy"], "not found"),
])
def test_run_bad_input(work: Path, capsys, setup, argv, message) -> None:
    if setup == "text":
        (work / "x.npy").write_text("hello")
    elif setup == "pickle":
        np.save(work / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif setup == "wrong":
        assert cli.main(["export", "int8.nnc", "--out", "m.onnx"]) == 0
        np.save(work / "x.npy", np.zeros((2, 16), dtype=np.float32))
    else:
        np.save(work / "x.npy", np.zeros((2, 1, 16), dtype=np.float32))
    capsys.readouterr()
    code = cli.main(argv)
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="needs gcc")
def test_float_model_to_c_with_calibration_data(work: Path, capsys) -> None:
    (work / "mydata.py").write_text(
        "import torch\n"
        "def load():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(300, 1, 16, generator=g)\n"
        "    y = torch.randint(0, 3, (300,), generator=g)\n"
        "    return x[:260], y[:260], x[260:], y[260:]\n")
    code, out, err = run_cli(capsys, "float.nnc", "--format", "c", "--data", "mydata:load")
    assert code == 0, err
    assert "256 training samples of mydata:load" in out
    assert "quantized to int8 for the C export" in out
    assert sorted(p.name for p in (work / "float_c").iterdir()) == ["model.c", "model.h"]
