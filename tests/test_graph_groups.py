"""Channel-group analysis on every reference model (pure: the model is not changed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress import models
from nncompress.graph import channel_groups
from nncompress.prune.structured import prunable_groups

SHAPES = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 8, 8), "rescnn": (1, 40),
          "gru": (1, 40), "lstm": (1, 40), "transformer": (1, 40)}


def groups_of(name: str) -> dict:
    torch.manual_seed(0)
    model = models.build(name, SHAPES[name], 10)
    return {g.name: g for g in channel_groups(model, torch.randn(2, *SHAPES[name]))}


def test_cnn1d_groups_couple_conv_bn_and_next_layer() -> None:
    g = groups_of("cnn1d")
    assert list(g) == ["features.conv1", "features.conv2", "features.conv3"]
    assert g["features.conv3"].consumers == ("classifier",)
    assert g["features.conv1"].norms == ("features.bn1",)
    assert g["features.conv2"].size == 64


def test_rescnn_residual_and_depthwise_groups() -> None:
    g = groups_of("rescnn")
    res = g["stem.0"]
    assert set(res.producers) == {"stem.0", "blocks.0.project", "blocks.1.project",
                                  "blocks.2.project"}
    assert set(res.consumers) == {"blocks.0.expand", "blocks.1.expand", "blocks.2.expand",
                                  "classifier"}
    assert set(res.norms) == {"stem.1", "blocks.0.bn3", "blocks.1.bn3", "blocks.2.bn3"}
    inner = g["blocks.0.expand"]
    assert inner.producers == ("blocks.0.expand", "blocks.0.depthwise")
    assert inner.consumers == ("blocks.0.project",)
    assert inner.norms == ("blocks.0.bn1", "blocks.0.bn2")


def test_cnn2d_flatten_consumer_has_spatial_unit_width() -> None:
    g = groups_of("cnn2d")
    assert g["features.conv2"].consumers == ("classifier.fc1",)
    assert g["features.conv2"].unit_width == 4  # 8x8 input, two 2x2 pools -> 2x2 per channel
    assert "classifier.fc3" not in g  # the model output is never a group


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_recurrent_hidden_groups(arch: str) -> None:
    g = groups_of(arch)
    assert list(g) == ["layers.0:hidden", "layers.1:hidden"]
    assert g["layers.0:hidden"].consumers == ("layers.1",)
    assert g["layers.1:hidden"].consumers == ("classifier",)
    assert g["layers.1:hidden"].kind == "hidden"


def test_transformer_heads_and_ffn_but_not_residual_width() -> None:
    g = groups_of("transformer")
    assert set(g) == {"blocks.0.attn:heads", "blocks.0.ffn.fc1", "blocks.1.attn:heads",
                      "blocks.1.ffn.fc1"}
    heads = g["blocks.0.attn:heads"]
    assert (heads.kind, heads.size, heads.unit_width) == ("heads", 4, 16)
    assert heads.consumers == ("blocks.0.attn.out",)


def test_mlp_groups_and_model_unchanged() -> None:
    model = models.build("mlp", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [g.name for g in channel_groups(model.train(), torch.randn(2, 1, 8, 8))]
    assert names == ["layers.fc1", "layers.fc2"]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.emb = nn.Embedding(4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) + self.emb.weight[0])


def test_a_group_whose_channels_meet_a_weight_read_directly_is_left_alone() -> None:
    """fc1's output is added to a row of an Embedding's weight, read without calling the
    layer: no tracer sees that coupling, so the trial removal catches it and names fc1."""
    notes: list[str] = []
    model = Custom()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert prunable_groups(model, torch.randn(2, 8), notes.append) == []
    assert any("fc1 alone" in n and "breaks the model" in n for n in notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
