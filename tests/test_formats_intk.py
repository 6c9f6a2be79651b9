"""The ``intk`` encoding: k-bit integers at k bits an element, at every width; corruption."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats import ENCODINGS
from nncompress.formats.choose import choose_encoding, tensor_stats
from nncompress.formats.encodings import tensor_to_bytes
from test_formats_corrupt import resign, split, write_v1

CODEC = ENCODINGS.get("intk")


def roundtrip(tensor: torch.Tensor) -> tuple[bytes, dict[str, int]]:
    data, params = CODEC.encode(tensor)
    data = bytes(data)
    out = CODEC.decode(data, params, tuple(tensor.shape), tensor.dtype)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)
    assert CODEC.max_numel(params, len(data), tuple(tensor.shape), 1, 2) >= tensor.numel()
    assert CODEC.min_size(tensor_stats(tensor)) <= len(data)
    return data, params


def k_bit_values(k: int, low: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``n`` values spanning exactly ``[low, low + 2**k - 1]`` (both ends present)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**k, (n,), generator=gen, dtype=torch.int64)
    values[:2] = torch.tensor([0, 2**k - 1])
    return (values + low).to(dtype)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("low", ["signed", "zero", "positive"])
def test_int8_codes_take_k_bits_at_every_width(k: int, low: str) -> None:
    start = {"signed": -(2 ** (k - 1)), "zero": 0, "positive": 127 - (2**k - 1)}[low]
    start = min(start, 127 - (2**k - 1))  # the range must fit int8
    tensor = k_bit_values(k, start, 301, torch.int8).reshape(7, 43)
    data, params = roundtrip(tensor)
    assert params["bits"] == k
    assert len(data) == math.ceil(301 * k / 8)
    zigzag = 2 * start if start >= 0 else -2 * start - 1
    assert params["offset"] == zigzag


@pytest.mark.parametrize(("k", "dtype"), [
    *((k, dtype) for k in range(1, 17) for dtype in (torch.int16, torch.int32, torch.int64)),
    *((k, dtype) for k in (24, 31, 32) for dtype in (torch.int32, torch.int64))])
def test_wider_integers_every_width(k: int, dtype: torch.dtype) -> None:
    low = -(2 ** (k - 1))
    data, params = roundtrip(k_bit_values(k, low, 97, dtype, seed=k))
    assert params["bits"] == k
    assert len(data) == math.ceil(97 * k / 8)


def test_other_dtypes_and_edge_cases_roundtrip() -> None:
    full = torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64)
    data, params = roundtrip(full)
    assert params == {"bits": 64, "offset": 0} and len(data) == 24  # raw words
    assert roundtrip(torch.tensor([0, 255, 7], dtype=torch.uint8))[1]["bits"] == 8
    assert roundtrip(torch.tensor([True, False, True]))[1] == {"bits": 1, "offset": 0}
    assert roundtrip(torch.tensor([True, True]))[1] == {"bits": 1, "offset": 2}
    assert roundtrip(torch.full((5, 3), -7, dtype=torch.int8))[0] == bytes(2)
    assert roundtrip(torch.zeros(0, 4, dtype=torch.int8))[0] == b""
    assert roundtrip(torch.tensor(-3, dtype=torch.int32))[1]["offset"] == 5
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1.5])
    roundtrip(special)  # floats travel as bit patterns (not chosen automatically)
    roundtrip(torch.randn(40, dtype=torch.float64))


def test_the_automatic_choice_takes_intk_for_k_bit_codes(tmp_path: Path) -> None:
    for k in (2, 3, 4, 5):
        half = 2 ** (k - 1)  # all 2**k codes equally likely: no entropy coder beats k bits
        gen = torch.Generator().manual_seed(k)
        codes = torch.randint(-half, half, (120, 90), generator=gen, dtype=torch.int8)
        choice = choose_encoding(codes)
        assert choice.encoding == "intk", (k, choice.encoding)
        assert choice.size == math.ceil(codes.numel() * k / 8)
    assert not CODEC.supports(torch.float32) and CODEC.supports(torch.int8)
    model = Codes(bits=3)
    path = tmp_path / "c.nnc"
    formats.save(model, path)
    info = {t.name: t for t in formats.inspect(path).tensors}
    assert info["codes"].encoding == "intk"
    assert info["codes"].stored_bytes == math.ceil(model.codes.numel() * 3 / 8)
    loaded = formats.load(path, builders={"t-codes": Codes})
    assert torch.equal(loaded.codes, model.codes)


class Codes(nn.Module):
    """A builder model holding a k-bit int8 code tensor (all 2**k codes equally likely)
    and a float step."""

    arch_name = "t-codes"

    def __init__(self, bits: int = 3, rows: int = 40, cols: int = 30) -> None:
        super().__init__()
        self.bits, self.rows, self.cols = bits, rows, cols
        half = 2 ** (bits - 1)
        gen = torch.Generator().manual_seed(bits)
        self.register_buffer("codes", torch.randint(-half, half, (rows, cols), generator=gen,
                                                    dtype=torch.int8))
        self.step = nn.Parameter(torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.codes.float() * self.step).T

    def arch_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "rows": self.rows, "cols": self.cols}


def decode(data: bytes, params: dict[str, Any], shape: tuple[int, ...] = (10,),
           dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return CODEC.decode(data, params, shape, dtype)


def one_line_error(data: bytes, params: Any, shape: tuple[int, ...] = (10,),
                   dtype: torch.dtype = torch.int8) -> str:
    with pytest.raises(FormatError) as info:
        decode(data, params, shape, dtype)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_corrupt_data_and_lying_params_are_refused() -> None:
    tensor = torch.tensor([-3, -1, 0, 1, 3, 2, 0, 0, -2, 1], dtype=torch.int8)
    data, params = CODEC.encode(tensor)
    data = bytes(data)
    assert params == {"bits": 3, "offset": 5}
    assert "need 4" in one_line_error(data[:-1], params)                  # truncated
    assert "need 4" in one_line_error(data + b"\x00", params)             # trailing bytes
    assert "padding" in one_line_error(data[:-1] + bytes([data[-1] | 0x80]), params)
    assert "range of int8" in one_line_error(data, {"bits": 3, "offset": 300})  # > 127
    assert "range of int8" in one_line_error(data, {"bits": 3, "offset": 257})  # < -128
    assert "range of int8" in one_line_error(b"\xff" * 10, {"bits": 8, "offset": 2})
    assert "intk bits" in one_line_error(data, {"bits": 9, "offset": 5})    # wider than int8
    assert "intk bits" in one_line_error(data, {"bits": 0, "offset": 5})
    assert "expects params" in one_line_error(data, {"bits": 3})
    assert "expects params" in one_line_error(data, [3, 5])
    assert "integer" in one_line_error(data, {"bits": 3.0, "offset": 5})
    assert "offset" in one_line_error(data, {"bits": 3, "offset": -1})
    wide = bytes(8 * 10)
    assert "at most 32" in one_line_error(wide, {"bits": 40, "offset": 0}, dtype=torch.int64)
    assert "offset 0" in one_line_error(wide, {"bits": 64, "offset": 2}, dtype=torch.int64)
    assert "0 or 1" in one_line_error(bytes([0b10]), {"bits": 2, "offset": 0}, (1,),
                                      torch.bool)


def test_high_values_beyond_the_dtype_are_refused() -> None:
    packed, _ = CODEC.encode(torch.tensor([0, 255, 3], dtype=torch.uint8))
    assert "range of uint8" in one_line_error(bytes(packed), {"bits": 8, "offset": 2}, (3,),
                                              torch.uint8)


def test_bounds_refuse_elements_the_bytes_cannot_hold() -> None:
    assert CODEC.max_numel({"bits": 3, "offset": 0}, 3, (8,), 1, 2) == 8
    assert CODEC.max_numel({"bits": 3, "offset": 0}, 3, (9,), 1, 2) < 9
    with pytest.raises(FormatError):
        CODEC.max_numel({"bits": 0, "offset": 0}, 3, (9,), 1, 2)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A version-1 file whose int8 code tensor is stored with ``intk``."""
    path = tmp_path / "codes.nnc"
    write_v1(Codes(bits=3, rows=41), path, encodings={"codes": "intk"})
    return path


def load(path: Path) -> nn.Module:
    """The fixture's model (41 x 30 codes: 3690 bits, so the last byte has padding)."""
    return formats.load(path, builders={"t-codes": Codes})


def assert_format_error(path: Path) -> str:
    with pytest.raises(FormatError) as info:
        load(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_container_truncation_and_mutation(saved: Path) -> None:
    assert torch.equal(load(saved).codes, Codes(bits=3, rows=41).codes)
    data = saved.read_bytes()
    for cut in sorted({*range(0, len(data), 7), *range(len(data) - 40, len(data))}):
        saved.write_bytes(data[:cut])
        assert_format_error(saved)
    _, header, payload = split(data)
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        mutated = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        resign(saved, bytes(mutated), raw=json.dumps(header).encode())
        try:  # any other exception fails the test
            load(saved)
            outcomes["ok"] += 1
        except FormatError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
    assert outcomes["ok"] > 0  # 3-bit fields hold any 3 bits: most mutations stay valid


@pytest.mark.parametrize(("params", "match"), [
    ({"bits": 3, "offset": 10**6}, "range of int8"),
    ({"bits": 2, "offset": 5}, "need"),
    ({"bits": 12, "offset": 5}, "can describe"),  # the container's bound comes first
    ({"bits": 3}, "expects params"),
])
def test_container_lying_headers(saved: Path, params: dict[str, Any], match: str) -> None:
    _, header, payload = split(saved.read_bytes())
    entry = next(t for t in header["tensors"] if t["name"] == "codes")
    assert entry["encoding"] == "intk"
    entry["params"] = params
    resign(saved, payload, header=header)
    assert match in assert_format_error(saved)
