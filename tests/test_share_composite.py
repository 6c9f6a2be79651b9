"""Composites of several models saved as one ``.nnc`` (nncompress.share.composite): every
member kind round-trips, compressed members included, and a hostile record is refused
with a one-line FormatError before anything but registered classes is built."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import tiny_data
from nncompress import api
from nncompress.errors import FormatError, ModelError
from nncompress.lowrank.layers import LowRankLinear
from nncompress.lowrank.svd import LowRankConfig, low_rank
from nncompress.models import MLP, build
from nncompress.share.composite import (
    BranchesModel,
    CascadeModel,
    MultiplexerModel,
    output_layer,
)
from nncompress.share.router import default_router
from nncompress.technique import Context


def _pair() -> list[nn.Module]:
    torch.manual_seed(0)
    return [MLP((1, 12), 3, hidden=(4,)).eval(), MLP((1, 12), 3, hidden=(64, 32)).eval()]


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    if isinstance(out_a, tuple):
        return all(torch.equal(p, q) for p, q in zip(out_a, out_b, strict=True))
    return torch.equal(out_a, out_b)


def test_each_composite_round_trips(tmp_path: Path) -> None:
    small, large = _pair()
    x = torch.randn(32, 1, 12)
    cnn = build("cnn1d", (1, 12), 4, channels=[6, 8], kernel_size=3)
    composites = {
        "cascade": CascadeModel([small, large], [0.8]),
        "multiplexer": MultiplexerModel([small, large], default_router((1, 12), 2), 0.6),
        "branches": BranchesModel(copy.deepcopy(cnn), output_layer(cnn),
                                  [nn.Linear(8, 2), nn.Sequential(nn.Linear(8, 5), nn.ReLU(),
                                                                  nn.Linear(5, 3))]),
    }
    for name, model in composites.items():
        api.save(model, tmp_path / f"{name}.nnc")
        back = api.load(tmp_path / f"{name}.nnc")
        assert type(back) is type(model), name
        assert _same(model, back, x), name
    assert api.load(tmp_path / "cascade.nnc").thresholds == (0.8,)
    assert api.load(tmp_path / "multiplexer.nnc").threshold == 0.6


def test_a_factorised_member_keeps_its_layers(tmp_path: Path) -> None:
    small, large = _pair()
    data = tiny_data()
    low = low_rank(copy.deepcopy(large), LowRankConfig(rank_ratio=0.25, min_params=0),
                   Context(data=data, progress=False))
    assert any(isinstance(m, LowRankLinear) for m in low.modules())
    cascade = CascadeModel([small, low], [0.9])
    api.save(cascade, tmp_path / "c.nnc")
    back = api.load(tmp_path / "c.nnc")
    assert any(isinstance(m, LowRankLinear) for m in back.models[1].modules())
    assert _same(cascade, back, torch.randn(16, 1, 12))


def test_the_backbone_record_is_the_classifier_before_the_cut() -> None:
    cnn = build("cnn1d", (1, 12), 4, channels=[6, 8], kernel_size=3)
    model = BranchesModel(copy.deepcopy(cnn), "classifier", [nn.Linear(8, 2)])
    assert model.arch_config()["backbone"] == {"name": "cnn1d", "config": cnn.arch_config()}
    assert isinstance(model.backbone.classifier, nn.Identity)
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("make, needle", [
    (lambda: CascadeModel([{"name": "cascade", "config": {}}, {"name": "mlp", "config": {}}],
                          [0.5]), "composites do not nest"),
    (lambda: CascadeModel([{"name": "os.system", "config": {}}] * 2, [0.5]),
     "unknown architecture 'os.system'"),
    (lambda: CascadeModel([{"name": "mlp"}] * 2, [0.5]), "lacks key 'config'"),
    (lambda: CascadeModel(_pair(), [float("nan")]), "threshold 0"),
    (lambda: CascadeModel(_pair(), [7.0]), "from 0 to 2"),
    (lambda: CascadeModel(_pair(), [True]), "threshold 0"),
    (lambda: MultiplexerModel(_pair(), [{"type": "builtins.eval", "args": None}], 0.5),
     "cannot be constructed from a file"),
    (lambda: BranchesModel({"name": "mlp", "config": {"input_shape": [1, 12],
                                                      "num_classes": 3}},
                           "layers.flatten", []), "not the backbone's Linear output layer"),
    (lambda: BranchesModel({"name": "mlp", "config": {"input_shape": [1, 12],
                                                      "num_classes": 3}},
                           "layers.nothing", []), "has no module 'layers.nothing'"),
])
def test_hostile_records_are_refused(make, needle: str) -> None:
    with pytest.raises(FormatError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_user_models_and_composites_cannot_be_members(tmp_path: Path) -> None:
    small, large = _pair()
    user = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ModelError, match="cascade model 1 is a user model"):
        api.save(CascadeModel([small, user], [0.5]), tmp_path / "c.nnc")
    inner = CascadeModel([small, large], [0.5])
    with pytest.raises(ModelError, match="composites do not nest"):
        api.save(CascadeModel([small, inner], [0.5]), tmp_path / "c.nnc")
    assert not (tmp_path / "c.nnc").exists()
