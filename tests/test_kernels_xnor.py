"""The XNOR-popcount C kernel against its plain-torch reference, and the kernel build."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nncompress.errors import KernelUnavailableError, NNCError
from nncompress.kernels import cbuild, xnor

needs_kernel = pytest.mark.skipif(not xnor.available(),
                                  reason=f"xnor kernel: {xnor.unavailable_reason()}")
ODD_K = (1, 63, 64, 65, 100, 1000)


def _signs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1).to(torch.int8)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pack_signs_layout_and_padding() -> None:
    signs = torch.tensor([[-1] + [1] * 63 + [-1, -1, 1], [1] * 66 + [-1]])  # K = 67
    packed = xnor.pack_signs(signs)
    assert packed.shape == (2, 2) and packed.dtype == torch.int64
    words = packed.numpy().view(np.uint64)
    assert words[0, 0] == 1 and words[0, 1] == 0b011
    assert words[1, 0] == 0 and words[1, 1] == 0b100  # bits past K stay clear


@needs_kernel
@pytest.mark.parametrize("k", ODD_K)
def test_pack_activations_equals_pack_signs(k: int) -> None:
    x = _randn(5, k, seed=k)
    t = _randn(k, seed=k + 1) * 0.3
    x[0, 0] = t[0]  # x == threshold is +1 in both
    expect = xnor.pack_signs(xnor.binarize(x, t))
    assert torch.equal(xnor.pack_activations(x, t), expect)
    assert torch.equal(xnor.pack_activations(x), xnor.pack_signs(xnor.binarize(x)))


@needs_kernel
@pytest.mark.parametrize("k", ODD_K)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_extras", [False, True])
def test_linear_kernel_equals_reference(k: int, batch: int, with_extras: bool) -> None:
    n = 7 if k < 1000 else 70  # n not a multiple of the kernel's block of 4 rows
    signs = _signs((n, k), seed=k)
    x = _randn(batch, k, seed=k + 10)
    alpha = torch.rand(n, generator=torch.Generator().manual_seed(k)) + 0.01
    bias = _randn(n, seed=k + 20) if with_extras else None
    t = _randn(k, seed=k + 30) * 0.5 if with_extras else None
    got = xnor.xnor_linear(x, xnor.pack_signs(signs), k, alpha, bias, t)
    want = xnor.xnor_linear_reference(x, signs, alpha, bias, t)
    assert got.shape == (batch, n)
    assert torch.equal(got, want)


@needs_kernel
def test_linear_kernel_integer_dots_and_leading_dims() -> None:
    k, n = 65, 5
    signs = _signs((n, k), seed=1)
    x = _randn(2, 3, k, seed=2)
    got = xnor.xnor_linear(x, xnor.pack_signs(signs), k, torch.ones(n))
    assert got.shape == (2, 3, n)
    dots = xnor.binarize(x) @ signs.float().T
    assert torch.equal(got, dots)
    assert float(got.abs().max()) <= k and bool(((got + k) % 2 == 0).all())  # K - 2 pc


CONV1D = [  # (C, L, O, k, stride, padding, dilation)
    (1, 40, 5, 5, 2, 2, 1),
    (3, 17, 4, 3, 1, 0, 1),
    (13, 10, 6, 5, 2, 2, 1),   # K = 65
    (7, 9, 3, 9, 1, 4, 1),     # K = 63, kernel as long as the input
    (20, 31, 9, 5, 3, 3, 2),   # K = 100, dilation
]


@needs_kernel
@pytest.mark.parametrize("case", CONV1D)
@pytest.mark.parametrize("batch", [1, 2])
def test_conv1d_kernel_equals_reference(case: tuple[int, ...], batch: int) -> None:
    c, length, o, k, stride, padding, dilation = case
    signs = _signs((o, c, k), seed=c)
    x = _randn(batch, c, length, seed=length)
    alpha, bias = torch.rand(o) + 0.1, _randn(o, seed=3)
    t = _randn(c, seed=4) * 0.2
    got = xnor.xnor_conv(x, xnor.pack_signs(signs), (k,), alpha, bias, t, stride, padding,
                         dilation)
    want = xnor.xnor_conv_reference(x, signs, alpha, bias, t, stride, padding, dilation)
    assert got.shape == want.shape
    assert torch.equal(got, want)


CONV2D = [  # (C, H, W, O, (kh, kw), stride, padding, dilation)
    (1, 8, 8, 4, (3, 3), 1, 1, 1),
    (7, 6, 9, 5, (3, 3), (1, 2), (1, 0), 1),    # K = 63
    (10, 5, 7, 3, (2, 5), 2, (1, 2), 1),      # K = 100
    (4, 9, 9, 6, (3, 3), 1, 2, 2),
]


@needs_kernel
@pytest.mark.parametrize("case", CONV2D)
def test_conv2d_kernel_equals_reference(case: tuple) -> None:
    c, h, w, o, ks, stride, padding, dilation = case
    signs = _signs((o, c, *ks), seed=h)
    x = _randn(2, c, h, w, seed=w)
    alpha = torch.rand(o) + 0.1
    got = xnor.xnor_conv(x, xnor.pack_signs(signs), ks, alpha, None, None, stride, padding,
                         dilation)
    want = xnor.xnor_conv_reference(x, signs, alpha, None, None, stride, padding, dilation)
    assert torch.equal(got, want)


@needs_kernel
def test_kernel_reports_its_popcount_path() -> None:
    status = xnor.kernel_status()
    assert status in ("AVX-512 VPOPCNTDQ", "scalar popcount")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "avx512_vpopcntdq" in cpuinfo.read_text():
        assert status == "AVX-512 VPOPCNTDQ"


def test_scalar_popcount_path_equals_reference(tmp_path, monkeypatch) -> None:
    """The same source built without AVX-512 (the path of CPUs without VPOPCNTDQ)."""
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(cbuild, "FLAGS", (*cbuild.FLAGS, "-mno-avx512f"))
    try:
        lib = ctypes.CDLL(str(cbuild.build("xnor")))
    except KernelUnavailableError as exc:
        pytest.skip(str(exc))
    lib.xnor_simd.restype = ctypes.c_int
    assert lib.xnor_simd() == 0
    k, n = 100, 7
    signs, x, alpha = _signs((n, k), seed=5), _randn(3, k, seed=6), torch.rand(n) + 0.1
    packed, out = xnor.pack_signs(signs), torch.empty(3, n)
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.xnor_linear.argtypes = [p, i, i, p, p, i, p, p, p]
    assert lib.xnor_linear(x.data_ptr(), 3, k, None, packed.data_ptr(), n, alpha.data_ptr(),
                           None, out.data_ptr()) == 0
    assert torch.equal(out, xnor.xnor_linear_reference(x, signs, alpha))


def test_build_is_cached_by_source_flags_and_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    try:
        path = cbuild.build("xnor")
    except KernelUnavailableError as exc:
        pytest.skip(str(exc))
    assert path.parent == tmp_path / "kernels" and path.name.startswith("xnor-")
    assert path.suffix == ".so" and path == cbuild.library_path("xnor")
    mtime = path.stat().st_mtime_ns
    assert cbuild.build("xnor") == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [path.name]  # no temp left
    lib = ctypes.CDLL(str(path))
    lib.xnor_simd.restype = ctypes.c_int
    assert lib.xnor_simd() in (0, 1)


def test_build_failure_names_library_and_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.c").write_text("int f(void) { return undefined_name; }\n")
    monkeypatch.setattr(cbuild, "C_DIR", tmp_path / "c")
    if not cbuild.available_compiler():
        pytest.skip("no gcc")
    with pytest.raises(KernelUnavailableError, match=r"'broken'.*gcc failed") as info:
        cbuild.build("broken")
    assert isinstance(info.value, NNCError) and "\n" not in str(info.value)
    assert not any((tmp_path / "kernels").iterdir())  # the temporary file is removed


def test_missing_gcc_and_bad_names_raise(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(KernelUnavailableError, match="not a kernel name"):
        cbuild.library_path("../etc")
    with pytest.raises(KernelUnavailableError, match=r"'nothere'.*no source"):
        cbuild.library_path("nothere")
    monkeypatch.setattr(cbuild, "_COMPILER", "no-such-gcc-xyz")
    cbuild._compiler_version.cache_clear()
    try:
        with pytest.raises(KernelUnavailableError, match="no-such-gcc-xyz not found"):
            cbuild.build("xnor")
    finally:
        monkeypatch.undo()
        cbuild._compiler_version.cache_clear()


def test_cli_builds_every_kernel(tmp_path) -> None:
    env = {"NNCOMPRESS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "nncompress.kernels.cbuild"], env=env,
                          capture_output=True, text=True, timeout=300)
    if not cbuild.available_compiler():
        assert done.returncode == 1 and "unavailable" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "kernels").glob("*.so"))
    assert built == sorted(cbuild.kernel_names()) and "xnor" in built
