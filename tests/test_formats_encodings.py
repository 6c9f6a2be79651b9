"""Every encoding round-trips at every dtype it supports, including edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nncompress.errors import FormatError
from nncompress.formats import DTYPES, ENCODINGS, Encoding
from nncompress.formats.encodings import bytes_to_tensor, tensor_to_bytes

SHAPES = [(), (0,), (0, 3), (1,), (7,), (3, 5), (2, 3, 4, 5)]
PATTERNS = ["random", "zeros", "single", "dense"]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], pattern: str,
                seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype``/``shape``: random with ~70% zeros, all zeros, one non-zero,
    or no zeros at all."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        values = torch.ones(numel, dtype=torch.bool)
    elif dtype.is_floating_point:
        values = (torch.rand(numel, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        values[::2] *= -1
    else:
        hi = 100 if dtype != torch.uint8 else 200
        values = torch.randint(1, hi, (numel,), generator=gen).to(dtype)
        if dtype != torch.uint8:
            values[::2] *= -1
    if pattern == "zeros":
        values = torch.zeros_like(values)
    elif pattern == "single":
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[numel // 2:numel // 2 + 1] = True
        values = torch.where(keep, values, torch.zeros_like(values))
    elif pattern == "random":
        keep = torch.rand(numel, generator=gen) < 0.3
        values = torch.where(keep, values, torch.zeros_like(values))
    return values.reshape(shape)


def cases() -> list[tuple[str, str]]:
    return [(enc, dt) for enc in ENCODINGS.names() for dt in sorted(ENCODINGS.get(enc).dtypes)]


def roundtrip(encoding: Encoding, tensor: torch.Tensor) -> tuple[torch.Tensor, bytes, dict]:
    data, params = encoding.encode(tensor)
    assert isinstance(data, (bytes, memoryview))  # bytes-like: dense data is a view
    data = bytes(data)
    out = encoding.decode(data, params, tuple(tensor.shape), tensor.dtype)
    return out, data, params


@pytest.mark.parametrize(("name", "dtype"), cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_roundtrip_every_encoding_dtype_shape(name: str, dtype: str, shape: tuple[int, ...],
                                              pattern: str) -> None:
    encoding = ENCODINGS.get(name)
    tensor = make_tensor(DTYPES[dtype].torch, shape, pattern)
    out, _, _ = roundtrip(encoding, tensor)
    assert out.shape == tensor.shape
    assert out.dtype == tensor.dtype
    if encoding.lossless:
        assert tensor_to_bytes(out) == tensor_to_bytes(tensor)  # bit-identical
    else:
        assert torch.allclose(out, tensor, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in ENCODINGS.names() if ENCODINGS.get(n).lossless])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_lossless_keeps_special_float_bits(name: str, dtype: str) -> None:
    torch_dtype = DTYPES[dtype].torch
    tensor = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, 3.5],
                          dtype=torch.float64).to(torch_dtype)
    out, _, _ = roundtrip(ENCODINGS.get(name), tensor)
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)
    assert torch.signbit(out[1])  # -0.0 stays negative


def test_dense_is_little_endian_raw_bytes() -> None:
    tensor = torch.tensor([1.0, -2.5], dtype=torch.float32)
    data, params = ENCODINGS.get("dense").encode(tensor)
    assert params == {}
    assert data == np.array([1.0, -2.5], dtype="<f4").tobytes()


def test_sparse_is_smaller_than_dense_for_mostly_zero_tensor() -> None:
    tensor = torch.randn(100, 100, generator=torch.Generator().manual_seed(1))
    tensor[torch.rand(100, 100, generator=torch.Generator().manual_seed(2)) < 0.9] = 0.0
    sparse, params = ENCODINGS.get("sparse").encode(tensor)
    dense, _ = ENCODINGS.get("dense").encode(tensor)
    nnz = int((tensor != 0).sum())
    assert params == {"nnz": nnz}
    assert len(sparse) == math.ceil(10_000 / 8) + 4 * nnz
    assert len(sparse) < 0.25 * len(dense)


def test_sparse_bitmap_layout() -> None:
    tensor = torch.tensor([0, 5, 0, 0, 0, 0, 0, 0, 7], dtype=torch.int8)
    data, params = ENCODINGS.get("sparse").encode(tensor)
    assert params == {"nnz": 2}
    assert data == bytes([0b00000010, 0b00000001, 5, 7])  # bit i%8 of byte i//8, then values


def test_fp16_halves_the_bytes_and_decodes_to_float32() -> None:
    tensor = torch.randn(64, generator=torch.Generator().manual_seed(3))
    out, data, _ = roundtrip(ENCODINGS.get("fp16"), tensor)
    assert len(data) == 2 * 64
    assert out.dtype == torch.float32
    assert torch.equal(out, tensor.half().float())
    assert not ENCODINGS.get("fp16").lossless


def test_fp16_refuses_values_beyond_half_range() -> None:
    with pytest.raises(FormatError, match="65504"):
        ENCODINGS.get("fp16").encode(torch.tensor([1.0, 1e6]))


def test_supports_matches_dtype_sets() -> None:
    assert ENCODINGS.get("fp16").supports(torch.float32)
    assert not ENCODINGS.get("fp16").supports(torch.int64)
    assert all(ENCODINGS.get("dense").supports(d.torch) for d in DTYPES.values())
    assert not ENCODINGS.get("dense").supports(torch.complex64)


def test_unknown_encoding_is_format_error_naming_it() -> None:
    with pytest.raises(FormatError, match="'zstd'"):
        ENCODINGS.get("zstd")


HOSTILE = [
    ("dense", b"\x00" * 8, {"extra": 1}, (2,), torch.float32),     # unexpected params
    ("dense", b"\x00" * 7, {}, (2,), torch.float32),               # wrong length
    ("dense", b"\x00\x02", {}, (2,), torch.bool),                  # bool byte not 0/1
    ("dense", b"\x00" * 8, [], (2,), torch.float32),               # params not a dict
    ("fp16", b"\x00" * 3, {}, (2,), torch.float32),                # wrong length
    ("sparse", b"\x01", {}, (1,), torch.int8),                     # missing nnz
    ("sparse", b"\x01\x05", {"nnz": True}, (1,), torch.int8),      # bool is not int
    ("sparse", b"\x01\x05", {"nnz": 5}, (1,), torch.int8),         # nnz > numel
    ("sparse", b"\x01\x05", {"nnz": -1}, (1,), torch.int8),        # negative nnz
    ("sparse", b"\x03\x05", {"nnz": 1}, (2,), torch.int8),         # bitmap count != nnz
    ("sparse", b"\x05\x05\x05", {"nnz": 2}, (2,), torch.int8),     # padding bit set
    ("sparse", b"\x01\x05\x05", {"nnz": 1}, (2,), torch.int8),     # trailing bytes
    ("sparse", b"\x01\x02", {"nnz": 1}, (1,), torch.bool),         # bool value 2
    ("sparse", b"", {"nnz": 0}, (2**31,), torch.float32),          # huge shape, no data
]


@pytest.mark.parametrize(("name", "data", "params", "shape", "dtype"), HOSTILE)
def test_decode_rejects_hostile_input(name: str, data: bytes, params: object,
                                      shape: tuple[int, ...], dtype: torch.dtype) -> None:
    with pytest.raises(FormatError) as info:
        ENCODINGS.get(name).decode(data, params, shape, dtype)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bytes_to_tensor_returns_writable_independent_tensor() -> None:
    data = bytearray(np.array([1, 2, 3], dtype="<i4").tobytes())
    out = bytes_to_tensor(memoryview(data), (3,), torch.int32)
    data[0] = 9
    out += 1
    assert out.tolist() == [2, 3, 4]
