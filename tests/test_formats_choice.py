"""The automatic encoding choice: exhaustive-equal on small tensors, cheap on large ones."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.formats import ENCODINGS, choose_encoding, encoded_sizes, smallest_encoding
from nncompress.formats.choose import smallest_sizes, tensor_stats
from nncompress.measure import weight_bytes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64]
SHAPES = [(300, 64), (100, 30), (10, 100), (32, 1, 5), (64, 32, 5), (7,), (0, 3), (), (1000,)]


def shared_pruned(shape: tuple[int, ...], codes: int, density: float, dtype: torch.dtype,
                  seed: int) -> torch.Tensor:
    """``density`` of the elements non-zero, drawn (skewed) from ``codes`` values."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(codes, generator=gen) * 4
    weights = 1.0 / torch.arange(1, codes + 1)
    picks = torch.multinomial(weights, max(math.prod(shape), 1), replacement=True,
                              generator=gen)[:math.prod(shape)]
    tensor = values[picks].reshape(shape)
    tensor = torch.where(torch.rand(shape, generator=gen) < density, tensor, 0.0)
    return tensor.to(dtype)


def plain_best(sizes: dict[str, int]) -> str:
    return smallest_encoding({n: b for n, b in sizes.items()
                              if not ENCODINGS.get(n).entropy_coded})


@pytest.mark.parametrize("seed", range(12))
def test_choice_equals_the_exhaustive_one_on_small_tensors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(12):
        shape = SHAPES[(seed + case) % len(SHAPES)]
        dtype = DTYPES[case % len(DTYPES)]
        tensor = shared_pruned(shape, int(rng.integers(1, 300)), float(rng.random()) ** 3,
                               dtype, 100 * seed + case)
        sizes = encoded_sizes(tensor)
        best = smallest_encoding(sizes)
        choice = choose_encoding(tensor)
        assert (choice.encoding, choice.size) == (best, sizes[best]), (shape, dtype)
        plain, coded = smallest_sizes(tensor)
        assert (plain.encoding, plain.size) == (plain_best(sizes), sizes[plain_best(sizes)])
        assert (coded.encoding, coded.size) == (best, sizes[best])
        out = ENCODINGS.get(choice.encoding).decode(bytes(choice.data), choice.params,
                                                    tuple(tensor.shape), tensor.dtype)
        assert out.view(-1).view(torch.uint8).tolist() == \
            tensor.reshape(-1).view(torch.uint8).tolist()


def large(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(1024, 1024, generator=gen)
    if kind == "dense":
        return dense
    if kind == "sparse99":
        return torch.where(torch.rand(1024, 1024, generator=gen) < 0.01, dense, 0.0)
    if kind == "shared32":
        return torch.randn(32, generator=gen)[torch.randint(0, 32, (1024, 1024), generator=gen)]
    if kind == "fp16-values":
        return dense.half().float()
    return torch.zeros(1024, 1024)


@pytest.mark.parametrize("kind", ["dense", "sparse99", "shared32", "fp16-values", "zeros"])
def test_choice_matches_the_exhaustive_one_on_large_tensors(kind: str) -> None:
    tensor = large(kind)
    sizes = encoded_sizes(tensor)
    choice = choose_encoding(tensor)
    assert (choice.encoding, choice.size) == (smallest_encoding(sizes),
                                              min(sizes.values()))


def test_large_dense_tensor_is_written_without_trying_other_encodings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(tensor: torch.Tensor, **_: Any) -> Any:
        raise AssertionError("an encoder that cannot win was run")

    for name in ENCODINGS.names():
        if name != "dense":
            monkeypatch.setattr(ENCODINGS.get(name), "encode", refuse)
    tensor = torch.nn.Linear(2000, 2000).weight.detach()
    stats = tensor_stats(tensor)
    assert not stats.exact and stats.nonzero == tensor.numel()
    start = time.perf_counter()
    choice = choose_encoding(tensor)
    assert choice.encoding == "dense" and isinstance(choice.data, memoryview)  # no copy
    assert time.perf_counter() - start < 2.0
    plain, coded = smallest_sizes(tensor)
    assert plain.encoding == coded.encoding == "dense"


def test_exact_statistics_of_a_small_tensor() -> None:
    tensor = torch.tensor([0.0, 0.0, 1.5, 1.5, -2.0, 0.0, 3.0, 0.0])
    stats = tensor_stats(tensor)
    assert (stats.numel, stats.itemsize, stats.nonzero) == (8, 4, 4)
    assert (stats.distinct, stats.distinct_nonzero, stats.exact) == (4, 3, True)
    entropy = -sum(c / 8 * math.log2(c / 8) for c in (4, 2, 1, 1)) * 8
    assert stats.entropy_bits == pytest.approx(entropy)
    for name in ENCODINGS.names():  # every bound is a true lower bound here
        codec = ENCODINGS.get(name)
        if codec.lossless:
            assert codec.min_size(stats) <= len(codec.encode(tensor)[0]), name


def test_weight_bytes_agree_with_the_exhaustive_sizes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 50), nn.Linear(50, 10))
    with torch.no_grad():
        model[0].weight.copy_(shared_pruned((50, 64), 16, 0.1, torch.float32, 3))
    rows = {r.name: r for r in weight_bytes(model)}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        sizes = encoded_sizes(param.detach())
        row = rows[name]
        assert (row.plain_encoding, row.plain) == (plain_best(sizes),
                                                   sizes[plain_best(sizes)])
        assert (row.coded_encoding, row.coded) == (smallest_encoding(sizes),
                                                   min(sizes.values()))


@pytest.mark.slow
def test_twenty_million_parameters_save_and_load_near_torch_speed(tmp_path: Path) -> None:
    """Five 2000 x 2000 Linears (80 MB of float32): nc save / load within 5 s and within
    5x torch.save / torch.load of the same weights (best of 3 each, same run)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2000, 2000) for _ in range(5)]).eval()
    skeleton = nn.Sequential(*[nn.Linear(2000, 2000) for _ in range(5)])
    times: dict[str, list[float]] = {k: [] for k in ("torch.save", "torch.load", "save", "load")}
    for _ in range(3):
        for key, call in (("torch.save", lambda: torch.save(model.state_dict(),
                                                            tmp_path / "m.pt")),
                          ("torch.load", lambda: torch.load(tmp_path / "m.pt")),
                          ("save", lambda: formats.save(model, tmp_path / "m.nnc")),
                          ("load", lambda: formats.load(tmp_path / "m.nnc", skeleton=skeleton))):
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    assert best["save"] <= 5 and best["load"] <= 5, best
    assert best["save"] <= 5 * best["torch.save"] and best["load"] <= 5 * best["torch.load"], best
    x = torch.randn(2, 2000)
    assert torch.equal(formats.load(tmp_path / "m.nnc", skeleton=skeleton)(x), model(x))
