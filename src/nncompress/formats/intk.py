"""The ``intk`` encoding: integers that fit ``k`` bits, stored at ``k`` bits per element.

Low-bit quantization (Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Quantized neural
networks: training neural networks with low precision weights and activations", 2017;
Esser, McKinstry, Bablani, Appuswamy & Modha, "Learned step size quantization", 2020)
leaves a layer's weights as integer codes of ``b`` bits held in an ``int8`` tensor; this
encoding stores such a tensor at ``b`` bits an element plus two header varints, where
``dense`` takes 8 and ``codebook`` adds its table of values.

Layout: ``numel`` unsigned values of ``bits`` bits each, bit-packed little-endian (value
``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least significant first; padding bits
are 0; see ``bits.py``). Element ``i`` is ``stored_i + low``, where ``low`` is the
smallest element and ``offset`` its zigzag code (``2 * low`` for ``low >= 0``, else
``-2 * low - 1``): ``int8`` codes -3..3 are stored as 0..6 with ``offset`` 5.
``params = {"bits", "offset"}``; ``bits`` is the smallest width holding ``max - min``:
1..32, or the dtype's full width with ``offset`` 0 when a wider range (or an offset beyond
a header varint's ``2**62``) would be needed, i.e. the raw words (two's complement for
signed dtypes). Integer dtypes are taken by value; floats and bools by their bit patterns
as unsigned integers.

Every dtype round-trips (floats as bit patterns, so the encoding is lossless), but the
automatic choice considers it only for integer and bool tensors, where it can win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nncompress.formats._checks import MAX_INT, check_int, fail
from nncompress.formats.bits import bits_for, pack_bits, packed_size, unpack_bits
from nncompress.formats.encodings import (
    ENCODINGS,
    WORDS,
    Buffer,
    Encoding,
    TensorStats,
    dtype_info,
    expect_params,
    int_param,
)
from nncompress.formats.packed import element_words, words_to_tensor

__all__ = ["PACKED_WIDTH", "IntK", "intk_params"]

#: The widest packed field; wider ranges are stored as the raw keys (the dtype's width).
PACKED_WIDTH = 32
_SIGNED = frozenset({"int8", "int16", "int32", "int64"})


def _sign_bit(dtype: torch.dtype) -> int:
    """The word bit flipped to turn a signed integer's bit pattern into its order key (the
    value plus this), 0 for other dtypes."""
    info = dtype_info(dtype)
    return 1 << (8 * info.itemsize - 1) if info.name in _SIGNED else 0


def _keys(tensor: torch.Tensor) -> np.ndarray:
    """The elements' order keys as ``uint64``: ``value + _sign_bit``, sorting like them."""
    return element_words(tensor).astype(np.uint64) ^ np.uint64(_sign_bit(tensor.dtype))


def intk_params(tensor: torch.Tensor) -> dict[str, int]:
    """The ``{"bits", "offset"}`` that :class:`IntK` stores ``tensor`` with."""
    width = 8 * dtype_info(tensor.dtype).itemsize
    keys = _keys(tensor)
    if not keys.size:
        return {"bits": 1, "offset": 0}
    low, high = int(keys.min()), int(keys.max())
    bits = bits_for(high - low + 1)
    offset = _zigzag(low - _sign_bit(tensor.dtype))
    if bits > PACKED_WIDTH or offset > MAX_INT:
        return {"bits": width, "offset": 0}
    return {"bits": bits, "offset": offset}


def _zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


def _unzigzag(code: int) -> int:
    return code // 2 if code % 2 == 0 else -(code + 1) // 2


class IntK(Encoding):
    """Integers of a small range, ``bits`` bits each after subtracting ``offset``.

    A ``b``-bit quantized weight (codes in ``-(2**(b-1) - 1) .. 2**(b-1) - 1``) takes ``b``
    bits an element; a pruned one is usually smaller still as ``sparse_rel`` (the choice
    is automatic). ``params = {"bits": 1..32 or the dtype's width, "offset": min key}``.
    """

    name = "intk"
    lossless = True
    code = 8
    dtypes = frozenset({"int8", "uint8", "int16", "int32", "int64", "bool"})
    param_keys = ("bits", "offset")

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        params = intk_params(tensor)
        bits = params["bits"]
        if bits > PACKED_WIDTH:  # the raw words
            return element_words(tensor).tobytes(), params
        low = _unzigzag(params["offset"]) + _sign_bit(tensor.dtype)
        return pack_bits(_keys(tensor) - np.uint64(low), bits), params

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.param_keys)
        width = 8 * dtype_info(dtype).itemsize
        bits = check_int(params["bits"], "intk bits", lo=1, hi=width)
        if PACKED_WIDTH < bits < width:
            fail(f"intk bits {bits} must be at most {PACKED_WIDTH} or the dtype's {width}")
        offset = check_int(params["offset"], "intk offset")
        values = unpack_bits(data, bits, numel, "intk values")
        if bits > PACKED_WIDTH:  # the raw words
            if offset:
                fail(f"intk raw words ({bits} bits) must have offset 0, got {offset}")
            return words_to_tensor(values, shape, dtype)
        low = _unzigzag(offset) + _sign_bit(dtype)
        top = (1 << width) - 1
        if low < 0 or (values.size and low + int(values.max()) > top) or low > top:
            fail(f"intk offset {offset} puts values outside the range of "
                 f"{dtype_info(dtype).name}")
        keys = values.astype(np.uint64) + np.uint64(low)
        words = (keys ^ np.uint64(_sign_bit(dtype))).astype(WORDS[width // 8])
        return words_to_tensor(words, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        bits = int_param(params, "bits", self.name, lo=1, hi=64)
        return 8 * length // bits

    def min_size(self, stats: TensorStats) -> int:
        """At least ``bits_for(distinct)`` bits an element (the range holds them all)."""
        return packed_size(stats.numel, bits_for(stats.distinct))


ENCODINGS.register(IntK.name, IntK())
