"""The dependency-free C export (``export(..., format="c")``): tiny versions of the MLP, the
1-D and 2-D CNNs (depthwise and residual included), the GRU and the LSTM compile with
``gcc -std=c99 -Wall -Wextra -Werror -O2`` and equal the integer reference bit for bit (through
``ctypes`` and through a small C driver); nothing from libc but <string.h>'s memcpy /
memmove / memset; the arena is exactly the peak the code touches; float ops and float
models are refused by name."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TINY_MODELS, tiny_program
from nncompress import models, runtime
from nncompress.errors import NNCError, UnsupportedLayerError
from nncompress.export import export, export_bytes
from nncompress.export.c_source import MCU_FLAGS, c_source, compile_object
from nncompress.quant.convert import convert
from nncompress.quant.int8 import Int8Model
from nncompress.quant.reference import run

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("size") is None,
                                reason="needs gcc and binutils")

#: the reference architectures the C export covers (the transformer keeps float ops)
C_MODELS = sorted(set(TINY_MODELS) - {"transformer"})


def _int8(name: str) -> tuple[Int8Model, tuple[int, ...]]:
    program, shape = tiny_program(name)
    return Int8Model.from_program(program), shape


def _samples(shape: tuple[int, ...], n: int = 17, seed: int = 2) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("name", C_MODELS)
def test_compiles_strict_and_is_bit_exact(name: str, tmp_path: Path) -> None:
    model, shape = _int8(name)
    result = export(model, tmp_path / "out", _samples(shape, 4), format="c")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.c", "model.h"]
    assert result.exact and "-Werror" in result.check
    assert result.flash_bytes > model.program.weight_bytes() // 2 and result.ram_bytes > 0
    deployed = runtime.load(tmp_path / "out")
    assert deployed.form == "c"
    x = _samples(shape, 19, seed=5)       # more samples than the export's check saw
    got = deployed.predict(x)
    want = run(model.program, x)[0].numpy()
    np.testing.assert_array_equal(got, want)


def test_only_stdint_and_string_from_the_c_library(tmp_path: Path) -> None:
    model, shape = _int8("lstm")
    c = c_source(model.program, [shape])
    includes = {ln.split()[1] for ln in c.source.splitlines() if ln.startswith("#include")}
    assert includes <= {"<stdint.h>", "<string.h>", '"model.h"', "<immintrin.h>"}
    # immintrin only behind the AVX-512 #if (never compiled without -march flags)
    assert "#include <immintrin.h>" not in c.source.split("#define NNC_VNNI 1")[0]
    obj = compile_object(c, tmp_path)
    undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True,
                               check=True).stdout.split()
    assert set(undefined) - {"U"} <= {"memcpy", "memmove", "memset"}   # <string.h>


DRIVER = r"""
#include <stdio.h>
#include "model.h"
int main(int argc, char **argv) {
    static float x[NNC_INPUT0_NUMEL], y[NNC_OUTPUT0_NUMEL];
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    (void)argc;
    while (fread(x, sizeof(float), NNC_INPUT0_NUMEL, in) == NNC_INPUT0_NUMEL) {
        if (nnc_predict(x, y)) return 1;
        fwrite(y, sizeof(float), NNC_OUTPUT0_NUMEL, out);
    }
    fclose(in); fclose(out);
    return 0;
}
"""


@pytest.mark.parametrize("name", ["cnn1d", "gru"])
def test_a_c_driver_gets_the_reference_outputs(name: str, tmp_path: Path) -> None:
    model, shape = _int8(name)
    export(model, tmp_path, _samples(shape, 2), format="c")
    (tmp_path / "main.c").write_text(DRIVER)
    exe = tmp_path / "driver"
    subprocess.run(["gcc", *MCU_FLAGS, "-o", str(exe), str(tmp_path / "main.c"),
                    str(tmp_path / "model.c")], check=True, capture_output=True)
    x = _samples(shape, 9, seed=7)
    x.numpy().astype("<f4").tofile(tmp_path / "x.bin")
    subprocess.run([str(exe), str(tmp_path / "x.bin"), str(tmp_path / "y.bin")], check=True)
    got = np.fromfile(tmp_path / "y.bin", dtype="<f4").reshape(9, -1)
    np.testing.assert_array_equal(got, run(model.program, x)[0].numpy().reshape(9, -1))


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "gru"])
def test_arena_is_the_measured_peak(name: str, tmp_path: Path) -> None:
    """Fill the arena (and guard bytes past it) with two patterns, run: the highest byte
    either run changed is the arena's last byte, and no guard byte changed."""
    model, shape = _int8(name)
    c = c_source(model.program, [shape])
    lib = ctypes.CDLL(str(compile_object(c, tmp_path, shared=True)))
    n, guard = c.info.arena_bytes, 256
    x = _samples(shape, 3)
    y = torch.empty((3, *c.info.outputs[0][2]))
    touched = np.zeros(n + guard, dtype=bool)
    for pattern in (0xA5, 0x5A):
        raw = np.full(n + guard + 64, pattern, dtype=np.uint8)
        start = (-raw.ctypes.data) % 64
        code = lib.nnc_run(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                           ctypes.c_int32(3), ctypes.c_void_p(raw.ctypes.data + start))
        assert code == 0
        touched |= raw[start:start + n + guard] != pattern
    assert not touched[n:].any(), "the code wrote past the arena"
    assert np.flatnonzero(touched).max() == n - 1
    np.testing.assert_array_equal(y.numpy(), run(model.program, x)[0].numpy())


def test_float_ops_are_refused_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    program, _ = convert(model, [torch.randn(16, 6)])
    with pytest.raises(UnsupportedLayerError, match=r"layer '1'.*float.*<math.h>"):
        export_bytes(Int8Model.from_program(program), torch.randn(2, 6), format="c")


def test_a_float_model_needs_calibration_samples_and_nothing_is_written(tmp_path: Path) -> None:
    model = models.build("mlp", (1, 5, 7), 3, hidden=[4]).eval()
    with pytest.raises(NNCError, match=r"at least 32 representative samples.*got 2 sample"):
        export(model, tmp_path / "out", torch.randn(2, 1, 5, 7), format="c")
    assert not (tmp_path / "out").exists()


def test_a_float_model_is_quantized_on_the_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 23), 3, channels=[5, 7, 9]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(48, 1, 23, generator=torch.Generator().manual_seed(4))
    result = export(model, tmp_path / "out", x, format="c")
    assert result.exact and any("quantized to int8 for the C export" in n for n in result.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # untouched
    with torch.no_grad():
        want = model(x).argmax(1).numpy()
    got = runtime.load(tmp_path / "out").predict(x).argmax(1)
    assert (got == want).mean() >= 0.9


def test_needs_an_example() -> None:
    model, _ = _int8("mlp")
    with pytest.raises(NNCError, match="example input"):
        export_bytes(model, None, format="c")


def test_onnx_and_c_and_nnc_through_one_runtime(tmp_path: Path) -> None:
    from nncompress import api

    model, shape = _int8("cnn1d")
    x = _samples(shape, 5)
    export(model, tmp_path / "m.onnx", x)
    export(model, tmp_path / "c", x, format="c")
    api.save(model, tmp_path / "m.nnc")
    want = run(model.program, x)[0].numpy()
    for path in (tmp_path / "m.onnx", tmp_path / "c", tmp_path / "m.nnc"):
        np.testing.assert_array_equal(runtime.load(path).predict(x), want, err_msg=str(path))
    with pytest.raises(NNCError, match=r"input 0: expected \[batch, 1, 23\], got \[5, 23\]"):
        runtime.load(tmp_path / "c").predict(x[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset", [("mlp", "digits"), ("cnn1d", "mnist1d"),
                                           ("cnn2d", "digits"), ("rescnn", "mnist1d"),
                                           ("gru", "mnist1d"), ("lstm", "mnist1d")])
def test_trained_reference_models_on_test_samples(name: str, dataset: str,
                                                  tmp_path: Path) -> None:
    from nncompress.quant.int8 import QuantizeInt8Config, quantize_int8
    from nncompress.technique import Context

    model, data = models.load(name, dataset=dataset)
    q = quantize_int8(model, QuantizeInt8Config(), Context(data=data, progress=False))
    x = torch.cat([b[0] for b in data.test])[:256]
    result = export(q, tmp_path, x[:8], format="c")
    assert result.exact
    np.testing.assert_array_equal(runtime.load(tmp_path).predict(x),
                                  run(q.program, x)[0].numpy())


def test_mlp_flash_is_close_to_its_int8_weights(tmp_path: Path) -> None:
    """The compact Linear form: unpadded [out][k] int8 weights, int32 biases, 16-bit
    multipliers, int8 shifts, computed dequantization -> flash <= 1.15x the weight bytes."""
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10).eval()             # 64-300-100-10
    program, _ = convert(model, [torch.randn(64, 1, 8, 8)])
    c = c_source(program, [(1, 8, 8)])
    assert "static const int64_t" not in c.source
    assert c.source.count("    nnc_dense_c(") == 3                 # every Linear compact
    result = export_bytes(Int8Model.from_program(program), torch.randn(4, 1, 8, 8), format="c")
    weights = sum(t.numel() for t in program.consts.values() if t.dtype == torch.int8)
    assert weights == 64 * 300 + 300 * 100 + 100 * 10
    assert result.flash_bytes <= 1.15 * weights, (result.flash_bytes, weights)
