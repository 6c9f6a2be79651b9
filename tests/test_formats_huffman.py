"""Canonical Huffman coder, ``codebook_huffman`` / ``sparse_rel_huffman``, entropy report."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from nncompress.errors import FormatError
from nncompress.formats import ENCODINGS
from nncompress.formats.encodings import tensor_to_bytes
from nncompress.formats.huffman import (
    MAX_LENGTH,
    check_lengths,
    code_lengths,
    entropy_report,
    huffman_decode,
    huffman_encode,
)


def roundtrip(name: str, tensor: torch.Tensor, **kwargs: int) -> tuple[bytes, dict]:
    codec = ENCODINGS.get(name)
    data, params = codec.encode(tensor, **kwargs)
    out = codec.decode(data, params, tuple(tensor.shape), tensor.dtype)
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)
    return data, params


def skewed(n: int, alphabet: int, seed: int = 0) -> np.ndarray:
    """A Zipf-like stream: symbol ``i`` with probability proportional to ``1 / (i + 1)``."""
    p = 1.0 / np.arange(1, alphabet + 1)
    return np.random.default_rng(seed).choice(alphabet, size=n, p=p / p.sum())


def entropy(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_code_lengths_are_optimal_and_complete() -> None:
    assert code_lengths(np.array([5, 2, 1, 1])).tolist() == [1, 2, 3, 3]
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    lengths = code_lengths(np.array([3, 0, 3, 3, 3]))
    assert sorted(lengths.tolist()) == [0, 2, 2, 2, 2]


def test_code_lengths_respect_the_limit() -> None:
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = code_lengths(np.array(fib))
    assert lengths.max() <= MAX_LENGTH
    assert sum(2.0 ** -lengths) == 1.0
    check_lengths(lengths, "x")  # complete
    assert code_lengths(np.array(fib), limit=8).max() <= 8


@pytest.mark.parametrize("alphabet", [1, 2, 3, 17, 256, 70_000])
def test_stream_roundtrips(alphabet: int) -> None:
    symbols = skewed(5000, alphabet, seed=alphabet)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    data = huffman_encode(symbols, lengths)
    assert np.array_equal(huffman_decode(data, lengths, symbols.size, "s"), symbols)


def test_skewed_stream_within_two_percent_of_entropy() -> None:
    symbols = skewed(100_000, 64)
    lengths = code_lengths(np.bincount(symbols, minlength=64))
    data = huffman_encode(symbols, lengths)
    bits_per_symbol = 8 * len(data) / symbols.size
    assert bits_per_symbol <= 1.02 * entropy(symbols)
    assert bits_per_symbol >= entropy(symbols)


def test_truncated_or_flipped_stream_is_a_clear_error() -> None:
    symbols = skewed(2000, 16)
    lengths = code_lengths(np.bincount(symbols, minlength=16))
    data = huffman_encode(symbols, lengths)
    with pytest.raises(FormatError, match="truncated"):
        huffman_decode(data[:-3], lengths, symbols.size, "s")
    tensor = torch.tensor([0.5, -1.0, 2.0, 0.25])[torch.from_numpy(symbols % 4)].float()
    for name in ("codebook_huffman", "sparse_rel_huffman"):
        coded, params = ENCODINGS.get(name).encode(tensor)
        for cut in (coded[:-1], coded[: len(coded) // 2]):
            with pytest.raises(FormatError, match="CRC-32"):
                ENCODINGS.get(name).decode(cut, params, (2000,), torch.float32)
        for bit in range(0, 8 * len(coded), 97):
            flipped = bytearray(coded)
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(FormatError, match="CRC-32"):
                ENCODINGS.get(name).decode(bytes(flipped), params, (2000,), torch.float32)


def test_flipped_stream_with_matching_crc_never_crashes() -> None:
    tensor = torch.tensor([0.5, -1.0, 2.0, 0.25])[torch.from_numpy(skewed(500, 4) % 4)]
    codec = ENCODINGS.get("codebook_huffman")
    coded, params = codec.encode(tensor)
    errors = 0
    for bit in range(8 * 16, 8 * len(coded)):  # the stream, past codebook and table
        flipped = bytearray(coded)
        flipped[bit // 8] ^= 1 << (bit % 8)
        forged = {**params, "crc32": zlib.crc32(flipped)}
        try:
            out = codec.decode(bytes(flipped), forged, (500,), torch.float32)
        except FormatError as exc:
            errors += 1
            assert "\n" not in str(exc)
        else:
            assert out.shape == (500,) and not torch.equal(out, tensor)
    assert errors > 0


BAD_TABLES = [
    ([1, 2], "complete prefix code"),     # Kraft sum 3/4
    ([1, 1, 1], "complete prefix code"),  # over-subscribed
    ([25, 1], "over 24"),
]


@pytest.mark.parametrize(("lengths", "message"), BAD_TABLES)
def test_bad_code_tables_are_refused(lengths: list[int], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        huffman_decode(b"\x00", np.array(lengths), 1, "s")


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_huffman_every_codebook_width(bits: int) -> None:
    codes = 2**bits
    rng = np.random.default_rng(bits)
    values = torch.from_numpy(rng.standard_normal(codes).astype(np.float32))
    tensor = values[torch.from_numpy(skewed(3000, codes, seed=bits))].reshape(30, 100)
    data, params = roundtrip("codebook_huffman", tensor)
    assert params["codes"] == int(torch.unique(tensor).numel())
    table = (5 * codes + 7) // 8  # 5-bit code lengths
    assert len(data) <= len(ENCODINGS.get("codebook").encode(tensor)[0]) + table


@pytest.mark.parametrize("index_bits", range(1, 17))
def test_sparse_rel_huffman_every_index_width(index_bits: int) -> None:
    tensor = torch.zeros(40, 100)
    tensor.view(-1)[[0, 7, 300, 301, 2500, 3999]] = torch.tensor([1.0, -1.0, 1.0, 2.0, -0.0,
                                                                  1.0])
    _, params = roundtrip("sparse_rel_huffman", tensor, index_bits=index_bits)
    assert params["index_bits"] == index_bits


@pytest.mark.parametrize("name", ["codebook_huffman", "sparse_rel_huffman"])
@pytest.mark.parametrize("case", ["zeros", "single", "empty", "scalar", "distinct"])
def test_huffman_encodings_edge_cases(name: str, case: str) -> None:
    tensor = {"zeros": torch.zeros(5, 5), "empty": torch.zeros(0, 3),
              "scalar": torch.tensor(-3.0), "distinct": torch.randn(50)}.get(case)
    if tensor is None:
        tensor = torch.zeros(1000)
        tensor[999] = 4.0
    roundtrip(name, tensor)


def test_pruned_shared_tensor_bytes_and_entropy_report() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(32, generator=gen)[torch.randint(0, 32, (300, 784), generator=gen)]
    tensor = torch.where(torch.rand(300, 784, generator=gen) < 0.9, 0.0, values)
    report = entropy_report(tensor)
    sizes = dict(report.encoded_bytes)
    assert report.dense_bytes == sizes["dense"] == 4 * 300 * 784
    assert sizes["sparse_rel_huffman"] < min(sizes["sparse_rel"], sizes["csr"])
    assert sizes["sparse_rel_huffman"] < 0.04 * sizes["dense"]
    for stream in ("indices", "values"):
        s = report.stream(stream)
        assert 0 <= s.excess < 0.02
        assert s.total_bytes >= s.table_bytes + s.huffman_bits * s.symbols / 8
    assert report.stream("weights").symbols == 300 * 784


def test_every_coded_stream_an_encoding_names_is_in_the_entropy_report() -> None:

    report = entropy_report(torch.tensor([0.0, 0.5, 0.0, 0.0, -0.25, 0.5] * 20))
    coded = [n for n in ENCODINGS.names() if ENCODINGS.get(n).entropy_coded]
    assert set(coded) == {"codebook_huffman", "sparse_rel_huffman"}
    for name in coded:
        for stream in ENCODINGS.get(name).coded_streams:
            assert report.stream(stream).symbols > 0
