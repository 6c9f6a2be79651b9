"""Loading bounds what a file may make us allocate: honest expansion per encoding, the
``max_bytes`` budget, construction guards; legitimate extremes still load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import nncompress as nc
from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats import ENCODINGS
from nncompress.formats.header import pack_chunks
from nncompress.formats.limits import DEFAULT_FLOOR, default_max_bytes
from nncompress.formats.packed import pack_bits
from nncompress.formats.table import write_header

models = pytest.importorskip("nncompress.models")


def write_v2(path: Path, header: dict[str, Any], blobs: list[bytes]) -> Path:
    """A version-2 file from a ``read_header``-shaped dict (offsets implied by order)."""
    raw = write_header(header["writer"], header["arch"], header["meta"], header["tensors"])
    path.write_bytes(b"".join(pack_chunks(raw, [b"".join(blobs)])))
    return path


def one_tensor(path: Path, shape: list[int], encoding: str, params: dict[str, int],
               data: bytes, dtype: str = "float32") -> Path:
    """A user-model file holding one buffer ``w``."""
    header = {"writer": "test", "arch": {"builder": {"name": None, "class": "t.W"},
                                         "modules": {}},
              "meta": {}, "tensors": [{"name": "w", "shape": shape, "dtype": dtype,
                                       "encoding": encoding, "params": params,
                                       "length": len(data)}]}
    return write_v2(path, header, [data])


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(0))


def saved_parts(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """``read_header`` of a file and its tensors' data, to edit and rewrite."""
    header = formats.read_header(path)
    data = path.read_bytes()
    start = 16 + int.from_bytes(data[8:16], "little")
    return header, [data[start + t["offset"]:start + t["offset"] + t["length"]]
                    for t in header["tensors"]]


def variant(source: Path, target: Path, edit: Any) -> Path:
    header, blobs = saved_parts(source)
    header = json.loads(json.dumps(header))
    edit(header, blobs)
    return write_v2(target, header, blobs)


def reference(tmp_path: Path, name: str, hidden: list[int]) -> Path:
    """A small reference model's file (narrow hidden layers keep it a few KB)."""
    shape = {"digits": (1, 8, 8), "mnist1d": (1, 40)}[models.spec(name).default_dataset]
    torch.manual_seed(0)
    path = tmp_path / f"{name}.nnc"
    formats.save(models.build(name, shape, 10, hidden=hidden), path)
    return path


def hashed_record(header: dict[str, Any], blobs: list[bytes]) -> None:
    """The mlp's first layer recorded as a HashedLinear of 2**28 virtual weights."""
    header["arch"]["modules"] = {"layers.fc1": {"type": "HashedLinear", "args": {
        "in_features": 1 << 14, "out_features": 1 << 14, "buckets": 16, "seed": 0,
        "bias": False}}}
    names = [t["name"] for t in header["tensors"]]
    i, j = names.index("layers.fc1.weight"), names.index("layers.fc1.bias")
    header["tensors"][i] = {"name": "layers.fc1.hashed_weight", "shape": [16],
                            "dtype": "float32", "encoding": "dense", "params": {},
                            "length": 64}
    blobs[i] = bytes(64)
    del header["tensors"][j], blobs[j]


def gru_record(layers: int) -> Any:
    def edit(header: dict[str, Any], blobs: list[bytes]) -> None:
        header["arch"]["modules"] = {"layers.0": {"type": "GRU", "args": {
            "input_size": 1, "hidden_size": 64, "num_layers": layers, "bias": True,
            "batch_first": True, "dropout": 0.0, "bidirectional": False}}}
    return edit


def config(**changes: Any) -> Any:
    def edit(header: dict[str, Any], blobs: list[bytes]) -> None:
        header["arch"]["builder"]["config"].update(changes)
    return edit


def hostile_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Few-KB files declaring gigabytes: name -> (path, what the refusal says)."""
    n = 1 << 26
    fillers = pack_bits(np.full(1024, 65535, dtype=np.uint64), 16) + bytes(4 * 1024)
    mlp, gru = reference(tmp_path, "mlp", [8, 8]), reference(tmp_path, "gru", [4])
    return {
        "sparse_rel-2^26-wide-index": (one_tensor(
            tmp_path / "a.nnc", [n], "sparse_rel", {"entries": 1, "index_bits": 26, "codes": 0,
                                                    "value_bits": 0},
            pack_bits(np.array([n - 1]), 26) + bytes(4)), "max_bytes"),
        "sparse_rel-2^26-fillers": (one_tensor(
            tmp_path / "b.nnc", [n], "sparse_rel", {"entries": 1024, "index_bits": 16,
                                                    "codes": 0, "value_bits": 0}, fillers),
            "max_bytes"),
        "sparse_rel-2^26-too-few-entries": (one_tensor(
            tmp_path / "c.nnc", [n], "sparse_rel", {"entries": 1, "index_bits": 16,
                                                    "codes": 0, "value_bits": 0},
            bytes(6)), "can describe at most"),
        "csr-2x2^30-zeros": (one_tensor(
            tmp_path / "d.nnc", [2, 1 << 30], "csr", {"nnz": 0, "ptr_bytes": 1, "col_bytes": 4,
                                                      "codes": 0, "value_bits": 0},
            bytes(3)), "max_bytes"),
        "dense-2^30": (one_tensor(tmp_path / "e.nnc", [1 << 30], "dense", {}, bytes(16)),
                       "can describe at most 4"),
        "codebook-2^31": (one_tensor(tmp_path / "f.nnc", [1 << 31], "codebook",
                                     {"codes": 1, "bits": 1}, bytes(5)),
                          "can describe at most 40"),
        "huffman-2^30": (one_tensor(tmp_path / "g.nnc", [1 << 30], "codebook_huffman",
                                    {"codes": 1, "crc32": 0}, bytes(6)), "at most 48"),
        "hashed-2^28-virtual": (variant(mlp, tmp_path / "h.nnc", hashed_record),
                                "parameters and buffers"),
        "builder-hidden-10^6": (variant(mlp, tmp_path / "i.nnc", config(hidden=[10**6, 100])),
                                "in the model"),
        "builder-hidden-10^9": (variant(mlp, tmp_path / "j.nnc", config(hidden=[10**9])),
                                "holds the integer 1000000000"),
        "module-linear-10^6-squared": (variant(mlp, tmp_path / "k.nnc", lambda h, b: h[
            "arch"].update(modules={"layers.fc1": {"type": "Linear", "args": {
                "in_features": 10**6, "out_features": 10**6, "bias": True}}})),
            "in the Linear its module records"),
        "gru-record-20000-layers": (variant(gru, tmp_path / "l.nnc", gru_record(20000)),
                                    "GRU of 80000 tensors"),
        "gru-config-20000-layers": (variant(gru, tmp_path / "m.nnc",
                                            config(hidden=64, num_layers=20000)),
                                    "torch calls"),
        "gru-config-10^9-layers": (variant(gru, tmp_path / "n.nnc",
                                           config(hidden=64, num_layers=10**9)),
                                   "holds the integer"),
    }


def load_any(path: Path) -> Any:
    """``load`` as a user would call it: user-model files with a skeleton."""
    header = formats.read_header(path)
    skeleton = Holder() if header["arch"]["builder"]["name"] is None else None
    return formats.load(path, skeleton=skeleton)


def resident_peak() -> Callable[[], int]:
    """Reset the process's peak resident size (Linux >= 4.0); the returned function gives
    the peak's growth since (0 where /proc cannot tell)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        start = resident("VmRSS")
    except OSError:
        return lambda: 0
    return lambda: resident("VmHWM") - start


def resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def test_few_kilobyte_files_declaring_gigabytes_are_refused_quickly(tmp_path: Path) -> None:
    """Refused within a second, numpy and Python allocating under 32 MiB (tracemalloc) and
    the process's resident peak growing under 64 MiB (torch included)."""
    for case, (path, says) in hostile_files(tmp_path).items():
        assert path.stat().st_size < 8000, case
        growth = resident_peak()
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(FormatError) as info:
            load_any(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        message = str(info.value)
        assert "\n" not in message and says in message, (case, message)
        assert seconds < 1, (case, seconds)
        assert peak < 32 * 2**20, (case, peak)
        assert growth() < 64 * 2**20, (case, growth())


CHILD = """
import resource, sys
from pathlib import Path
import torch
from torch import nn
from nncompress import formats
from nncompress.errors import FormatError
torch.set_num_threads(1)
class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(0))
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 300 * 2**20, resource.RLIM_INFINITY))
for arg in sys.argv[1:]:
    path = Path(arg)
    try:
        user = formats.read_header(path)["arch"]["builder"]["name"] is None
        formats.load(path, skeleton=Holder() if user else None)
        print(path.name, "loaded")
    except FormatError:
        print(path.name, "FormatError")
    except BaseException as exc:
        print(path.name, type(exc).__name__)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_refusals_stay_within_300_mb_of_address_space(tmp_path: Path) -> None:
    """In a child whose address space is capped 300 MB above its start, every hostile
    file still gives FormatError (not MemoryError or an allocator's RuntimeError)."""
    files = [path for path, _ in hostile_files(tmp_path).values()]
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, files)], capture_output=True,
                          text=True, timeout=300)
    lines = done.stdout.split("\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split()[1] for line in lines if line] == ["FormatError"] * len(files), \
        done.stdout


def test_default_budget_and_its_message(tmp_path: Path) -> None:
    assert default_max_bytes(1000) == DEFAULT_FLOOR == 64 * 2**20
    assert default_max_bytes(2**20) == 2**30
    model = Holder()
    model.w = torch.zeros(1 + (1 << 24))  # 64 MiB of zeros in a tiny file
    formats.save(model, tmp_path / "z.nnc")
    assert (tmp_path / "z.nnc").stat().st_size < 2000
    with pytest.raises(FormatError, match=r"would allocate 67,108,868 bytes .*max_bytes="
                                          r"67,108,864 \(the default .*pass a larger "
                                          r"max_bytes="):
        formats.load(tmp_path / "z.nnc", skeleton=Holder())
    loaded = nc.load(tmp_path / "z.nnc", skeleton=Holder(), max_bytes=2**27)  # api passes it
    assert loaded.w.shape == (1 + (1 << 24),) and not loaded.w.any()
    with pytest.raises(FormatError, match=r"max_bytes=10 \(as passed\)"):
        formats.read_tensors(tmp_path / "z.nnc", max_bytes=10)
    with pytest.raises(FormatError, match="max_bytes must be"):
        formats.inspect(tmp_path / "z.nnc", max_bytes=-1)


def test_a_large_sparse_tensor_still_loads(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.where(torch.rand(2048, 2048, generator=gen) < 0.01,
                         torch.randn(2048, 2048, generator=gen), 0.0)
    model = nn.Linear(2048, 2048, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    formats.save(model, tmp_path / "s.nnc")
    assert (tmp_path / "s.nnc").stat().st_size < 0.05 * weight.numel() * 4
    loaded = formats.load(tmp_path / "s.nnc", skeleton=nn.Linear(2048, 2048, bias=False))
    assert torch.equal(loaded.weight, weight)


def extremes() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    last = torch.zeros(70_000)
    last[-1] = 2.0
    return [torch.zeros(70_000), last, torch.zeros(3, 0), torch.tensor(1.5),
            torch.randn(300, generator=gen), torch.randn(5, 7000, generator=gen)]


@pytest.mark.parametrize("name", [n for n in ENCODINGS.names()])
def test_every_encoding_states_a_bound_its_own_output_meets(name: str) -> None:
    codec = ENCODINGS.get(name)
    for tensor in extremes():
        data, params = codec.encode(tensor)
        most = codec.max_numel(params, len(data), tuple(tensor.shape), 4, 2)
        assert tensor.numel() <= most, (name, tuple(tensor.shape), most)


def test_decoders_allocate_in_proportion_to_their_output() -> None:
    gen = torch.Generator().manual_seed(0)
    tensor = torch.where(torch.rand(1 << 20, generator=gen) < 0.01,
                         torch.randn(32, generator=gen)[torch.randint(0, 32, (1 << 20,),
                                                                     generator=gen)], 0.0)
    output = tensor.numel() * 4
    for name in ("sparse", "codebook", "sparse_rel", "csr", "codebook_huffman",
                 "sparse_rel_huffman"):
        codec = ENCODINGS.get(name)
        data, params = codec.encode(tensor)
        tracemalloc.start()
        out = codec.decode(data, params, tuple(tensor.shape), tensor.dtype)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert torch.equal(out, tensor)
        assert peak < 4 * output, (name, peak / output)


def test_huffman_stream_of_a_million_symbols_decodes_fast() -> None:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 33)
    symbols = rng.choice(32, size=1 << 20, p=p / p.sum())
    codec = ENCODINGS.get("codebook_huffman")
    tensor = torch.from_numpy(rng.standard_normal(32).astype(np.float32))[symbols]
    data, params = codec.encode(tensor)
    start = time.process_time()
    out = codec.decode(data, params, tuple(tensor.shape), tensor.dtype)
    assert torch.equal(out, tensor)
    assert time.process_time() - start < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("codes", [2, 32, 256])
def test_huffman_tensor_of_2_to_the_24_decodes_well_under_a_second(codes: int) -> None:
    rng = np.random.default_rng(codes)
    p = 1.0 / np.arange(1, codes + 1)
    symbols = rng.choice(codes, size=1 << 24, p=p / p.sum())
    tensor = torch.from_numpy(rng.standard_normal(codes).astype(np.float32))[symbols]
    codec = ENCODINGS.get("codebook_huffman")
    data, params = codec.encode(tensor)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        out = codec.decode(data, params, tuple(tensor.shape), tensor.dtype)
        best = min(best, time.perf_counter() - start)
    assert torch.equal(out, tensor)
    assert best < 1.0, best
