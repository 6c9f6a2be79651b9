"""Bit packing and the ``codebook`` / ``sparse_rel`` / ``csr`` encodings, at every width."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats import ENCODINGS
from nncompress.formats.encodings import tensor_to_bytes
from nncompress.formats.packed import (
    pack_bits,
    relative_diffs,
    relative_positions,
    unpack_bits,
)


def roundtrip(name: str, tensor: torch.Tensor, **kwargs: int) -> tuple[bytes, dict]:
    codec = ENCODINGS.get(name)
    data, params = codec.encode(tensor, **kwargs)
    out = codec.decode(data, params, tuple(tensor.shape), tensor.dtype)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)
    return data, params


def shared_pruned(shape: tuple[int, ...], codes: int, density: float, seed: int = 0
                  ) -> torch.Tensor:
    """``density`` of the elements non-zero, drawn from ``codes`` distinct values."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(codes, generator=gen)[torch.randint(0, codes, shape, generator=gen)]
    return torch.where(torch.rand(shape, generator=gen) < density, values, 0.0)


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_bits_roundtrips_every_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=37, dtype=np.uint64)
    values[:2] = [0, 2**bits - 1]
    data = pack_bits(values, bits)
    assert len(data) == math.ceil(37 * bits / 8)
    assert np.array_equal(unpack_bits(data, bits, 37, "x"), values)


def test_pack_bits_is_little_endian() -> None:
    assert pack_bits(np.array([1, 2, 3]), 3) == bytes([0b11010001, 0b0])
    with pytest.raises(FormatError, match="padding bits"):
        unpack_bits(bytes([0b11010001, 0b10]), 3, 3, "x")
    with pytest.raises(FormatError, match="3 values of 3 bits need 2"):
        unpack_bits(b"\x00", 3, 3, "x")


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_every_bit_width(bits: int) -> None:
    for codes in {2 ** (bits - 1) + 1 if bits > 1 else 1, 2**bits}:
        tensor = torch.randn(codes, dtype=torch.float64).float()[torch.arange(300) % codes]
        data, params = roundtrip("codebook", tensor.reshape(30, 10))
        assert params == {"codes": codes, "bits": bits}
        assert len(data) == 4 * codes + math.ceil(300 * bits / 8)


def test_codebook_beyond_eight_bits_and_special_values() -> None:
    _, params = roundtrip("codebook", torch.arange(300, dtype=torch.float32))
    assert params["bits"] == 9
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 0.0, -0.0])
    _, params = roundtrip("codebook", special)
    assert params["codes"] == 4  # 0.0 and -0.0 are different bit patterns


def test_relative_diffs_insert_fillers_like_the_paper() -> None:
    # Han et al. (2015), Fig. 2 style: 3-bit indices, a gap of 8 zeros needs one filler.
    positions = np.array([1, 4, 13])
    diffs, real = relative_diffs(positions, 3)
    assert diffs.tolist() == [1, 2, 7, 0]  # 13 - 4 - 1 = 8 zeros: skip 7, filler, skip 0
    assert real.tolist() == [True, True, False, True]
    assert relative_positions(diffs, 14, "x").tolist() == [1, 4, 12, 13]


@pytest.mark.parametrize("index_bits", [*range(1, 17), 24, 32])
def test_sparse_rel_every_index_width_with_long_gaps(index_bits: int) -> None:
    tensor = torch.zeros(5000)
    tensor[[0, 3, 40, 41, 1200, 4999]] = torch.tensor([1.5, -2.0, 3.0, 1.5, -0.0, 7.0])
    _, params = roundtrip("sparse_rel", tensor, index_bits=index_bits)
    gaps = np.diff([-1, 0, 3, 40, 41, 1200, 4999]) - 1
    assert params["entries"] == 6 + int((gaps >> index_bits).sum())
    assert params["index_bits"] == index_bits


@pytest.mark.parametrize("name", ["codebook", "sparse_rel", "csr"])
@pytest.mark.parametrize("case", ["zeros", "single_first", "single_last", "empty", "scalar"])
def test_edge_cases_roundtrip(name: str, case: str) -> None:
    tensor = {"zeros": torch.zeros(7, 9), "empty": torch.zeros(0, 4),
              "scalar": torch.tensor(2.5)}.get(case, torch.zeros(6, 50))
    if case == "single_first":
        tensor[0, 0] = 3.0
    elif case == "single_last":
        tensor[-1, -1] = -1.0
    data, _ = roundtrip(name, tensor)
    if case == "zeros":
        assert len(data) < 4 * 7 * 9 / 8


def test_csr_views_conv_weight_as_out_by_rest() -> None:
    weight = shared_pruned((8, 4, 3), codes=4, density=0.3)
    data, params = roundtrip("csr", weight)
    nnz = int((weight != 0).sum())
    assert params["nnz"] == nnz and params["ptr_bytes"] == 1 and params["col_bytes"] == 1
    codes, bits = params["codes"], params["value_bits"]
    values = 4 * codes + math.ceil(nnz * bits / 8) if codes else 4 * nnz
    assert len(data) == 9 + nnz + values  # 9 one-byte row pointers, one-byte columns


def test_pruned_shared_tensor_is_much_smaller_packed() -> None:
    tensor = shared_pruned((300, 784), codes=32, density=0.1)
    sizes = {n: len(ENCODINGS.get(n).encode(tensor)[0]) for n in ("dense", "sparse",
                                                                   "codebook", "sparse_rel", "csr")}
    assert sizes["sparse_rel"] < 0.3 * sizes["sparse"]
    assert sizes["sparse_rel"] < 0.04 * sizes["dense"]
    assert sizes["codebook"] < 0.2 * sizes["dense"]


def test_save_auto_choice_shrinks_pruned_shared_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        model[0].weight.copy_(shared_pruned((100, 200), codes=16, density=0.1))
    auto = formats.save(model, tmp_path / "auto.nnc")
    dense = formats.save(model, tmp_path / "dense.nnc",
                         encodings={k: "sparse" for k in model.state_dict()})
    chosen = {t.name: t.encoding for t in formats.inspect(tmp_path / "auto.nnc").tensors}
    assert chosen["0.weight"] not in {"dense", "sparse"}
    assert auto < 0.5 * dense
    loaded = formats.load(tmp_path / "auto.nnc", skeleton=nn.Sequential(
        nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10)))
    assert torch.equal(loaded[0].weight, model[0].weight)


HOSTILE = [
    ("codebook", b"\x00" * 5, {"codes": 1}, (2,)),                          # missing bits
    ("codebook", b"\x00" * 5, {"codes": 1, "bits": 2}, (2,)),               # bits != fit
    ("codebook", b"\x00" * 4 + b"\x02", {"codes": 1, "bits": 1}, (2,)),     # index >= codes
    ("codebook", b"\x00" * 4 + b"\x04", {"codes": 1, "bits": 1}, (2,)),     # padding bit
    ("codebook", b"\x00" * 4, {"codes": 1, "bits": 1}, (2,)),               # truncated
    ("codebook", b"\x00" * 8 + b"\x00", {"codes": 2, "bits": 1}, (2,)),     # not ascending
    ("codebook", b"\x00" * 9, {"codes": 3, "bits": 2}, (2,)),               # codes > numel
    ("codebook", b"", {"codes": 0, "bits": 1}, (2**31,)),                   # huge, no data
    ("sparse_rel", b"\x07" + b"\x00" * 4, {"entries": 1, "index_bits": 3, "codes": 0,
                                           "value_bits": 0}, (4,)),          # past the end
    ("sparse_rel", b"\x00", {"entries": 1, "index_bits": 3, "codes": 0,
                             "value_bits": 0}, (4,)),                        # values missing
    ("sparse_rel", b"\x00" * 5, {"entries": 1, "index_bits": 33, "codes": 0,
                                 "value_bits": 0}, (4,)),                    # width > 32
    ("sparse_rel", b"\x00" * 5, {"entries": 1, "index_bits": 3, "codes": 0,
                                 "value_bits": 2}, (4,)),                    # raw w/ bits
    ("sparse_rel", b"", {"entries": 5, "index_bits": 3, "codes": 0,
                         "value_bits": 0}, (4,)),                            # entries > numel
    ("csr", b"\x00\x01\x00" + b"\x00" * 4, {"nnz": 1, "ptr_bytes": 1, "col_bytes": 1,
                                            "codes": 0, "value_bits": 0}, (2, 2)),  # ptr>nnz
    ("csr", b"\x00\x01\x01\x05" + b"\x00" * 4, {"nnz": 1, "ptr_bytes": 1, "col_bytes": 1,
                                                "codes": 0, "value_bits": 0}, (2, 2)),  # col
    ("csr", b"\x00\x02\x02\x01\x01" + b"\x00" * 8, {"nnz": 2, "ptr_bytes": 1, "col_bytes": 1,
                                                    "codes": 0, "value_bits": 0}, (2, 2)),  # dup
    ("csr", b"\x00" * 3, {"nnz": 0, "ptr_bytes": 3, "col_bytes": 1, "codes": 0,
                          "value_bits": 0}, (2, 2)),                          # width 3
]


@pytest.mark.parametrize(("name", "data", "params", "shape"), HOSTILE)
def test_decode_rejects_hostile_input(name: str, data: bytes, params: dict,
                                      shape: tuple[int, ...]) -> None:
    with pytest.raises(FormatError) as info:
        ENCODINGS.get(name).decode(data, params, shape, torch.float32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["codebook", "sparse_rel", "csr", "codebook_huffman",
                                  "sparse_rel_huffman"])
def test_random_corruption_gives_format_error_or_a_tensor(name: str) -> None:
    rng = np.random.default_rng(0)
    tensor = shared_pruned((20, 30), codes=8, density=0.2)
    codec = ENCODINGS.get(name)
    data, params = codec.encode(tensor)
    for _ in range(100):
        corrupt, forged = bytearray(data), dict(params)
        if rng.random() < 0.5:
            corrupt[rng.integers(len(corrupt))] ^= 1 << int(rng.integers(8))
        else:
            key = sorted(forged)[rng.integers(len(forged))]
            forged[key] = [0, 1, 3, 17, 33, -1, 10**9, None, True][rng.integers(9)]
        if "crc32" in forged and forged["crc32"] == params["crc32"]:
            forged["crc32"] = zlib.crc32(corrupt)  # get past the checksum
        try:
            out = codec.decode(bytes(corrupt), forged, (20, 30), torch.float32)
        except FormatError as exc:
            assert "\n" not in str(exc)
        else:
            assert out.shape == (20, 30)
