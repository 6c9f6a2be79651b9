"""The architecture record: builders, the module table, and structurally shrunk layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats.arch import build_module, describe, module_spec
from nncompress.formats.layer_types import layer_types
from nncompress.lowrank.layers import LowRankConv1d, LowRankConv2d, LowRankLinear, LowRankRNN
from nncompress.modules import SplitMultiheadAttention, SplitTransformerEncoderLayer
from nncompress.share.hashing import HashedEmbedding, HashedLinear


class TinyMLP(nn.Module):
    """Duck-typed ArchModule whose config is its constructor args (not the live widths),
    so a layer shrunk after construction is only described by the module records."""

    arch_name = "t-mlp"

    def __init__(self, inputs: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.config = {"inputs": inputs, "hidden": hidden, "classes": classes}
        self.fc1 = nn.Linear(inputs, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def arch_config(self) -> dict[str, Any]:
        return dict(self.config)


def shrink_hidden(model: TinyMLP, keep: list[int]) -> None:
    """Structurally prune hidden units: narrower fc1 (rows) and fc2 (columns)."""
    fc1, fc2 = model.fc1, model.fc2
    narrow1, narrow2 = nn.Linear(fc1.in_features, len(keep)), nn.Linear(len(keep),
                                                                          fc2.out_features)
    with torch.no_grad():
        narrow1.weight.copy_(fc1.weight[keep])
        narrow1.bias.copy_(fc1.bias[keep])
        narrow2.weight.copy_(fc2.weight[:, keep])
        narrow2.bias.copy_(fc2.bias)
    model.fc1, model.fc2 = narrow1, narrow2


def test_shrunk_layer_roundtrips_with_original_model_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    shrink_hidden(model, [0, 3, 4, 9, 15])
    formats.save(model, tmp_path / "p.nnc")
    loaded = formats.load(tmp_path / "p.nnc", builders={"t-mlp": TinyMLP})
    assert (loaded.fc1.out_features, loaded.fc2.in_features) == (5, 5)
    x = torch.randn(6, 8)
    assert torch.equal(loaded(x), model(x))
    header = formats.read_header(tmp_path / "p.nnc")
    assert header["arch"]["builder"] == {"name": "t-mlp", "config": {
        "inputs": 8, "hidden": 16, "classes": 3}}
    assert header["arch"]["modules"]["fc1"]["args"]["out_features"] == 5


def test_shrunk_layer_loads_into_a_wide_skeleton(tmp_path: Path) -> None:
    model = TinyMLP().eval()
    shrink_hidden(model, [1, 2])
    formats.save(model, tmp_path / "p.nnc")
    loaded = formats.load(tmp_path / "p.nnc", skeleton=TinyMLP())
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), model(x))


def test_describe_records_builder_and_tensor_owning_modules() -> None:
    record = describe(TinyMLP(hidden=4))
    assert record["builder"] == {"name": "t-mlp", "config": {"inputs": 8, "hidden": 4,
                                                            "classes": 3}}
    assert set(record["modules"]) == {"fc1", "fc2"}  # ReLU and the root own no tensors
    assert record["modules"]["fc2"] == {"type": "Linear", "args": {
        "in_features": 4, "out_features": 3, "bias": True}}


def test_describe_user_model_records_class_and_non_table_owners() -> None:
    class WithPos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(3))
            self.body = nn.Sequential(nn.Linear(3, 3))

    record = describe(WithPos())
    assert record["builder"]["name"] is None
    assert record["builder"]["class"].endswith("WithPos")
    assert record["modules"][""] == {"type": record["builder"]["class"], "args": None}
    assert record["modules"]["body.0"]["type"] == "Linear"


def test_unserialisable_arch_config_is_format_error(tmp_path: Path) -> None:
    class BadConfig(TinyMLP):
        arch_name = "t-bad"

        def arch_config(self) -> dict[str, Any]:
            return {"f": object()}

    with pytest.raises(FormatError, match=r"arch_config\(\) is not JSON-serialisable"):
        formats.save(BadConfig(), tmp_path / "b.nnc")
    assert list(tmp_path.iterdir()) == []


# (the module to save, a skeleton module of the same type but other args)
TABLE_CASES: list[tuple[nn.Module, nn.Module]] = [
    (nn.Linear(3, 4, bias=False), nn.Linear(3, 5)),
    (nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"),
     nn.Conv1d(2, 2, 1)),
    (nn.Conv2d(2, 4, (3, 1), padding="same", dilation=(1, 2), padding_mode="circular"),
     nn.Conv2d(1, 1, 1)),
    (nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=False), nn.BatchNorm1d(3)),
    (nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3)),
    (nn.LayerNorm((4, 5), eps=1e-6, bias=False), nn.LayerNorm(4)),
    (nn.Embedding(12, 3, padding_idx=2, max_norm=1.5, scale_grad_by_freq=True),
     nn.Embedding(2, 2)),
    (nn.GRU(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.25,
            bidirectional=True), nn.GRU(1, 1)),
    (nn.LSTM(3, 6, proj_size=2), nn.LSTM(3, 6)),
    (nn.RNN(3, 4, nonlinearity="relu"), nn.RNN(3, 4)),
    (LowRankLinear(6, 5, 2, bias=False), LowRankLinear(6, 5, 3)),
    (LowRankConv1d(3, 4, 2, 3, stride=2, padding=1), LowRankConv1d(3, 4, 1, 1)),
    (LowRankConv2d(3, 4, 2, (3, 1), padding="same", bias=False), LowRankConv2d(1, 1, 1, 1)),
    (LowRankRNN("LSTM", 5, 2, 6, proj_size=3), LowRankRNN("GRU", 5, 2, 6)),
    (nn.Identity(), nn.BatchNorm1d(3)),  # a folded / removed layer replaces the built one
    (HashedLinear(6, 5, 7, seed=3, bias=False), nn.Linear(6, 5)),
    (HashedEmbedding(12, 3, 7, seed=2, padding_idx=1), nn.Embedding(12, 3)),
    (nn.GroupNorm(3, 6, eps=1e-3), nn.GroupNorm(2, 4)),
    (nn.InstanceNorm1d(4, affine=True), nn.InstanceNorm1d(2, affine=True)),
    (nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
     nn.InstanceNorm2d(3, affine=True)),
    (nn.RMSNorm((4,), eps=1e-4), nn.RMSNorm(3)),
    (SplitMultiheadAttention(8, 2, head_dim=3, kdim=5, batch_first=True),
     nn.MultiheadAttention(8, 2)),
    (SplitTransformerEncoderLayer(8, 2, 16, dropout_p=0.0, activation_name="gelu",
                                  norm_first=True), nn.TransformerEncoderLayer(8, 2, 16)),
    # a container keeps only its recorded children (layers removed by layer pruning)
    (nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 3), nn.ReLU())),
    (nn.ModuleList([nn.Linear(2, 3)]), nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 3)])),
]


#: parameter-free operations: never recorded in a file's modules (they own no tensors),
#: rebuilt by builders that record their own structure (share.zipping.ZippedPair)
OPERATION_CASES: list[nn.Module] = [
    nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.2),
    nn.Flatten(1, -1), nn.Dropout(0.3), nn.AdaptiveAvgPool1d(2), nn.MaxPool1d(3, 2, 1),
    nn.AvgPool1d(2, 1, 1),
]


#: where the layer types these cases cover are defined (other packages test their own)
COVERED_HOMES = ("torch.nn.", "nncompress.lowrank.", "nncompress.share.",
                 "nncompress.modules.")


def test_table_cases_cover_every_module_type() -> None:
    covered = {type(m).__name__ for m, _ in TABLE_CASES}
    covered |= {type(m).__name__ for m in OPERATION_CASES}
    table = layer_types()
    expected = {n for n in table.names() if table.get(n).cls.__module__.startswith(COVERED_HOMES)}
    assert len(expected) >= 35 and covered == expected


@pytest.mark.parametrize("op", OPERATION_CASES, ids=lambda m: type(m).__name__)
def test_operations_rebuild_from_their_spec(op: nn.Module) -> None:
    spec = module_spec(op)
    rebuilt = build_module(json.loads(json.dumps(spec)), "op")
    assert type(rebuilt) is type(op) and module_spec(rebuilt) == spec
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(rebuilt.eval()(x), op.eval()(x))


@pytest.mark.parametrize(("module", "other"), TABLE_CASES,
                         ids=[type(m).__name__ + str(i) for i, (m, _) in enumerate(TABLE_CASES)])
def test_every_table_type_is_rebuilt_from_its_record(tmp_path: Path, module: nn.Module,
                                                     other: nn.Module) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(module).eval()
    formats.save(model, tmp_path / "t.nnc")
    skeleton = nn.Sequential(other)
    assert module_spec(skeleton[0]) != module_spec(module)
    loaded = formats.load(tmp_path / "t.nnc", skeleton=skeleton)
    assert type(loaded[0]) is type(module)
    assert module_spec(loaded[0]) == module_spec(module)
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded[0].state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_non_table_module_type_must_match(tmp_path: Path) -> None:
    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

    class B(A):
        pass

    formats.save(A(), tmp_path / "a.nnc")
    with pytest.raises(FormatError,
                       match=r"module '' is recorded as .*\.A' but the model has .*\.B"):
        formats.load(tmp_path / "a.nnc", skeleton=B())


def test_recorded_module_missing_from_model(tmp_path: Path) -> None:
    formats.save(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), tmp_path / "s.nnc")
    with pytest.raises(FormatError, match=r"module '' records child '1', which the model's "
                                          r"Sequential lacks"):
        formats.load(tmp_path / "s.nnc", skeleton=nn.Sequential(nn.Linear(2, 2)))
    formats.save(nn.ModuleDict({"a": nn.Linear(2, 2)}), tmp_path / "d.nnc")
    with pytest.raises(FormatError, match=r"module 'b' recorded in the file is not in the "
                                          r"model"):
        formats.save(nn.ModuleDict({"b": nn.Linear(2, 2)}), tmp_path / "e.nnc")
        formats.load(tmp_path / "e.nnc", skeleton=nn.ModuleDict({"a": nn.Linear(2, 2)}))


def test_a_class_recorded_from_a_script_matches_the_same_class_imported() -> None:
    from nncompress.formats.arch import same_class

    assert same_class("__main__.Net", type("Net", (), {"__module__": "mypkg.models"}))
    assert same_class("mypkg.models.Net", type("Net", (), {"__module__": "__main__"}))
    assert not same_class("mypkg.models.Net", type("Net", (), {"__module__": "other"}))
    assert not same_class("__main__.Net", type("Other", (), {"__module__": "mypkg"}))


def test_table_module_shape_mismatch_names_tensor(tmp_path: Path) -> None:
    class Odd(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.fc.register_buffer("extra", torch.zeros(n))

    formats.save(Odd(3), tmp_path / "o.nnc")
    with pytest.raises(FormatError, match=r"tensor 'fc.extra' has shape \[3\] in the file "
                                          r"but \[5\] in the model"):
        formats.load(tmp_path / "o.nnc", skeleton=Odd(5))


def test_rebuilding_from_a_spec_validates_every_field() -> None:
    assert isinstance(build_module({"type": "ReLU", "args": {}}, "op"), nn.ReLU)
    with pytest.raises(FormatError, match=r"type 'os\.system' cannot be constructed"):
        build_module({"type": "os.system", "args": {}}, "op")
    with pytest.raises(FormatError, match="unexpected key"):
        build_module({"type": "ReLU", "args": {"inplace": True}}, "op")
    with pytest.raises(FormatError, match="p must be between 0 and 1"):
        build_module({"type": "Dropout", "args": {"p": 3}}, "op")
