"""save / load / read_header / inspect of the .nnc container on small test models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats import ENCODINGS
from nncompress.registry import Registry


class Conv1dNet(nn.Module):
    """Duck-typed ArchModule: Conv1d + BatchNorm1d + LayerNorm + Linear on [B, 2, 8]."""

    arch_name = "t-conv1d"

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv1d(2, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(channels)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(channels * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(torch.relu(self.bn(self.conv(x)))).flatten(1))

    def arch_config(self) -> dict[str, Any]:
        return {"channels": self.channels}


class Conv2dNet(nn.Module):
    arch_name = "t-conv2d"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, (3, 2), stride=(1, 2), padding=1, dilation=1, groups=1)
        self.bn = nn.BatchNorm2d(3, eps=1e-3, momentum=None)
        self.head = nn.Linear(3 * 6 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, 6, 4]
        return self.head(self.bn(self.conv(x)).flatten(1))

    def arch_config(self) -> dict[str, Any]:
        return {}


class RecurrentNet(nn.Module):
    arch_name = "t-rnn"

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 5, batch_first=True)
        self.lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True, proj_size=3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 2, 8]
        h, _ = self.gru(x.transpose(1, 2))
        h, _ = self.lstm(h)
        return self.head(h[:, -1])

    def arch_config(self) -> dict[str, Any]:
        return {}


class UserNet(nn.Module):
    """A plain user model: Embedding + a positional parameter + LayerNorm + Linear."""

    def __init__(self, tokens: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, tokens, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: int64 [B, tokens]
        return self.head(self.norm(self.embed(x) + self.pos).mean(1))


BUILDERS = {"t-conv1d": Conv1dNet, "t-conv2d": Conv2dNet, "t-rnn": RecurrentNet}
CASES: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (Conv1dNet, (4, 2, 8)),
    (Conv2dNet, (4, 1, 6, 4)),
    (RecurrentNet, (4, 2, 8)),
]


def trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Run one batch in train mode so BatchNorm running stats are non-trivial."""
    model.train()
    model(torch.randn(shape))
    return model.eval()


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize(("factory", "shape"), CASES)
def test_roundtrip_gives_bit_identical_outputs(tmp_path: Path, factory: Callable[[], nn.Module],
                                               shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = trained(factory(), shape)
    x = torch.randn(shape)
    written = formats.save(model, tmp_path / "m.nnc")
    assert written == (tmp_path / "m.nnc").stat().st_size
    loaded = formats.load(tmp_path / "m.nnc", builders=BUILDERS)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_builders_may_be_a_registry(tmp_path: Path) -> None:
    registry: Registry[type[nn.Module]] = Registry("test architecture")
    registry.register(Conv1dNet.arch_name, Conv1dNet)
    model = trained(Conv1dNet(5), (2, 2, 8))
    formats.save(model, tmp_path / "m.nnc")
    loaded = formats.load(tmp_path / "m.nnc", builders=registry)
    assert loaded.conv.out_channels == 5
    x = torch.randn(3, 2, 8)
    assert torch.equal(loaded(x), model(x))


def test_unknown_architecture_names_it_and_builders(tmp_path: Path) -> None:
    formats.save(Conv1dNet(), tmp_path / "m.nnc")
    with pytest.raises(FormatError, match=r"'t-conv1d'.*builders="):
        formats.load(tmp_path / "m.nnc")


def test_user_model_needs_skeleton(tmp_path: Path) -> None:
    formats.save(UserNet(), tmp_path / "u.nnc")
    with pytest.raises(FormatError, match=r"user model of class .*UserNet; pass skeleton="):
        formats.load(tmp_path / "u.nnc")


def test_user_model_with_skeleton_takes_recorded_parameter_shape(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = UserNet(tokens=5).eval()
    formats.save(model, tmp_path / "u.nnc")
    skeleton = UserNet(tokens=7)  # positional parameter of another shape
    loaded = formats.load(tmp_path / "u.nnc", skeleton=skeleton)
    assert loaded is skeleton
    assert loaded.pos.shape == (1, 5, 4)
    assert isinstance(loaded.pos, nn.Parameter) and loaded.pos.requires_grad
    x = torch.randint(0, 10, (3, 5))
    assert torch.equal(loaded(x), model(x))


def test_loaded_tensors_keep_their_dtype(tmp_path: Path) -> None:
    model = Conv1dNet().double().eval()
    formats.save(model, tmp_path / "d.nnc")
    loaded = formats.load(tmp_path / "d.nnc", builders=BUILDERS)
    assert loaded.conv.weight.dtype == torch.float64
    x = torch.randn(2, 2, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def test_load_does_not_touch_global_rng(tmp_path: Path) -> None:
    formats.save(Conv1dNet(), tmp_path / "m.nnc")
    state = torch.get_rng_state()
    formats.load(tmp_path / "m.nnc", builders=BUILDERS)
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_choice_dense_for_dense_sparse_for_pruned(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 30))
    with torch.no_grad():
        weight = model[1].weight
        weight[torch.rand_like(weight) < 0.9] = 0.0
    dense_size = formats.save(model, tmp_path / "m.nnc", encodings={
        "1.weight": "dense"})
    auto_size = formats.save(model, tmp_path / "m.nnc")
    chosen = {t.name: t.encoding for t in formats.inspect(tmp_path / "m.nnc").tensors}
    assert chosen == {"0.weight": "dense", "0.bias": "dense", "1.weight": "sparse_rel",
                      "1.bias": "dense"}
    assert auto_size < dense_size - 0.6 * 40 * 30 * 4
    loaded = formats.load(tmp_path / "m.nnc", skeleton=nn.Sequential(nn.Linear(50, 40),
                                                                      nn.Linear(40, 30)))
    assert torch.equal(loaded[1].weight, model[1].weight)


def test_fp16_on_request(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Linear(64, 32)
    full = formats.save(model, tmp_path / "a.nnc")
    half = formats.save(model, tmp_path / "b.nnc", encodings={"weight": "fp16"})
    assert full - half >= 64 * 32 * 2 - 8  # the header differs by a few bytes only
    stored = {t.name: t.stored_bytes for t in formats.inspect(tmp_path / "b.nnc").tensors}
    assert stored == {"weight": 64 * 32 * 2, "bias": 32 * 4}
    header = formats.read_header(tmp_path / "b.nnc")
    assert {t["name"]: t["encoding"] for t in header["tensors"]} == {
        "weight": "fp16", "bias": "dense"}
    loaded = formats.load(tmp_path / "b.nnc", skeleton=nn.Linear(64, 32))
    assert loaded.weight.dtype == torch.float32
    assert torch.equal(loaded.weight, model.weight.detach().half().float())
    assert torch.equal(loaded.bias, model.bias)


@pytest.mark.parametrize(("encodings", "pattern"), [
    ({"nope.weight": "dense"}, r"tensor 'nope.weight'.*tensors: weight, bias"),
    ({"weight": "zstd"}, r"unknown encoding 'zstd'; known: .*dense.*fp16.*sparse"),
    ({"counts": "fp16"}, r"encoding 'fp16' cannot store tensor 'counts' of dtype int64"),
])
def test_bad_encoding_requests(tmp_path: Path, encodings: dict[str, str], pattern: str) -> None:
    model = nn.Linear(2, 2)
    model.register_buffer("counts", torch.arange(3))
    with pytest.raises(FormatError, match=pattern):
        formats.save(model, tmp_path / "m.nnc", encodings=encodings)
    assert list(tmp_path.iterdir()) == []


def test_meta_roundtrip_and_header_fields(tmp_path: Path) -> None:
    meta = {"accuracy": 0.93, "tags": ["pruned", 1], "nested": {"k": None}}
    formats.save(nn.Linear(3, 2), tmp_path / "m.nnc", meta=meta)
    header = formats.read_header(tmp_path / "m.nnc")
    assert header["meta"] == meta
    assert header["format_version"] == formats.FORMAT_VERSION
    assert header["arch"]["builder"]["name"] is None
    assert header["arch"]["modules"] == {"": {"type": "Linear", "args": {
        "in_features": 3, "out_features": 2, "bias": True}}}
    assert [(t["name"], t["shape"], t["dtype"]) for t in header["tensors"]] == [
        ("weight", [2, 3], "float32"), ("bias", [2], "float32")]
    info = formats.inspect(tmp_path / "m.nnc")
    assert info.meta == meta


def test_inspect_reports_sizes_and_sparsity(tmp_path: Path) -> None:
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, :3] = 1.0
        model.bias.fill_(2.0)
    total = formats.save(model, tmp_path / "m.nnc", encodings={"weight": "sparse", "bias": "dense"})
    info = formats.inspect(tmp_path / "m.nnc")
    weight, bias = info.tensors
    assert (weight.name, weight.shape, weight.dtype, weight.encoding) == (
        "weight", (10, 10), "float32", "sparse")
    assert weight.stored_bytes == 13 + 3 * 4 and weight.raw_bytes == 400
    assert weight.sparsity == pytest.approx(0.97)
    assert weight.bits_per_element == pytest.approx(8 * 25 / 100)
    assert (bias.encoding, bias.sparsity, bias.stored_bytes) == ("dense", 0.0, 40)
    assert info.total_bytes == total
    assert info.stored_bytes == 25 + 40 and info.raw_bytes == 440
    assert total == 16 + info.header_bytes + info.stored_bytes + 32
    assert info.arch.startswith("user:") and info.arch.endswith("Linear")


@pytest.mark.parametrize("meta", [{"f": object()}, {"nan": float("nan")}, ["not", "a dict"]])
def test_unserialisable_meta_leaves_no_file(tmp_path: Path, meta: Any) -> None:
    target = tmp_path / "m.nnc"
    target.write_bytes(b"previous")
    with pytest.raises(FormatError, match="meta"):
        formats.save(nn.Linear(2, 2), target, meta=meta)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nnc"]


def test_failing_encoder_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(tensor: torch.Tensor) -> tuple[bytes, dict]:
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(ENCODINGS.get("sparse"), "encode", boom)
    with pytest.raises(RuntimeError, match="encoder failed"):
        formats.save(nn.Linear(2, 2), tmp_path / "m.nnc", encodings={"weight": "sparse"})
    monkeypatch.setattr(ENCODINGS.get("dense"), "encode", boom)  # the automatic choice's
    with pytest.raises(RuntimeError, match="encoder failed"):
        formats.save(nn.Linear(2, 2), tmp_path / "m.nnc")
    assert list(tmp_path.iterdir()) == []


def test_failure_during_write_removes_temp_and_keeps_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.nnc"
    formats.save(nn.Linear(2, 2), target)
    before = target.read_bytes()
    seen: list[str] = []

    def failing_fsync(fd: int) -> None:
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(FormatError, match=r"cannot write .*m.nnc: No space left on device"):
        formats.save(nn.Linear(3, 3), target)
    assert seen and seen[0].startswith(".m.nnc.")  # the temp file sat beside the target
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nnc"]


def test_save_into_missing_folder_is_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot write"):
        formats.save(nn.Linear(2, 2), tmp_path / "missing" / "m.nnc")


def test_save_overwrites_atomically_and_keeps_permissions(tmp_path: Path) -> None:
    target = tmp_path / "m.nnc"
    formats.save(nn.Linear(2, 2), target)
    formats.save(nn.Linear(4, 4), target)
    assert formats.read_header(target)["tensors"][0]["shape"] == [4, 4]
    assert target.stat().st_mode & 0o644 == 0o644  # not a 0600 temp-file mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nnc"]


def test_missing_file_names_path(tmp_path: Path) -> None:
    for call in (formats.load, formats.read_header, formats.inspect):
        with pytest.raises(FormatError, match=r"no such file: .*absent.nnc"):
            call(tmp_path / "absent.nnc")
    with pytest.raises(FormatError, match="is a folder"):
        formats.load(tmp_path)


def test_save_refuses_non_tensor_state_and_bad_dtypes(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    model.register_buffer("z", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(FormatError, match=r"tensor 'z' has dtype torch.complex64"):
        formats.save(model, tmp_path / "m.nnc")
    with pytest.raises(FormatError, match=r"nn\.Module"):
        formats.save({"weight": torch.zeros(1)}, tmp_path / "m.nnc")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


class Holder(nn.Module):
    """A plain module owning a parameter and, optionally, a buffer."""

    def __init__(self, with_buffer: bool) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(2))
        if with_buffer:
            self.register_buffer("b", torch.zeros(2))


def test_strict_loading_names_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    formats.save(Holder(with_buffer=True), tmp_path / "m.nnc")
    with pytest.raises(FormatError, match=r"file holds tensor 'b' that the model does not"):
        formats.load(tmp_path / "m.nnc", skeleton=Holder(with_buffer=False))
    formats.save(Holder(with_buffer=False), tmp_path / "m.nnc")
    with pytest.raises(FormatError, match=r"tensor 'b' of the model is missing from the file"):
        formats.load(tmp_path / "m.nnc", skeleton=Holder(with_buffer=True))


def test_skeleton_layer_with_other_args_is_rebuilt_from_the_file(tmp_path: Path) -> None:
    model = nn.Linear(2, 3)
    formats.save(model, tmp_path / "m.nnc")
    loaded = formats.load(tmp_path / "m.nnc", skeleton=nn.Linear(2, 5, bias=False))
    assert (loaded.out_features, loaded.bias is not None) == (3, True)
    assert torch.equal(loaded.weight, model.weight)


def test_encoder_errors_name_the_tensor(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1e6)
    with pytest.raises(FormatError, match=r"tensor 'weight': encoding 'fp16' cannot store"):
        formats.save(model, tmp_path / "m.nnc", encodings={"weight": "fp16"})
    with pytest.raises(FormatError, match="encodings must map tensor names"):
        formats.save(model, tmp_path / "m.nnc", encodings="fp16")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_bool_and_integer_buffers_roundtrip(tmp_path: Path) -> None:
    model = Holder(with_buffer=False)
    model.register_buffer("mask", torch.tensor([True, False, True]))
    model.register_buffer("codes", torch.tensor([[-128, 0], [5, 127]], dtype=torch.int8))
    model.register_buffer("count", torch.tensor(7))
    formats.save(model, tmp_path / "m.nnc")
    skeleton = Holder(with_buffer=False)
    skeleton.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
    skeleton.register_buffer("codes", torch.zeros(2, 2, dtype=torch.int8))
    skeleton.register_buffer("count", torch.tensor(0))
    loaded = formats.load(tmp_path / "m.nnc", skeleton=skeleton)
    for name in ("mask", "codes", "count"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    info = {t.name: t for t in formats.inspect(tmp_path / "m.nnc").tensors}
    assert info["count"].shape == () and info["mask"].sparsity == pytest.approx(1 / 3)
