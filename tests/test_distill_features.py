"""Feature taps, adapters and hint losses (FitNets / ShrinkTeaNet feature distillation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nncompress import models
from nncompress.distill.features import (
    Adapter,
    FeatureDistiller,
    FeatureTap,
    HintLoss,
    channel_dim_of,
)
from nncompress.errors import ModelError, RecipeError

SHAPE = (1, 40)


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _cnn(channels: tuple[int, ...] = (8, 16, 32), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("cnn1d", SHAPE, 10, channels=channels).eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_tap_captures_named_layers_like_a_manual_forward() -> None:
    model, x = _cnn(), _x()
    names = ["features.conv2", "features.relu1", "classifier"]
    with torch.no_grad(), FeatureTap(model, names) as tap:
        out = model(x)
        manual = model.features[:5](x)            # conv1 bn1 relu1 conv2 bn2 -> after bn2
        conv2 = model.features[:4](x)
        relu1 = model.features[:3](x)
    assert tap["features.conv2"].shape == conv2.shape == (4, 16, conv2.shape[-1])
    assert torch.equal(tap["features.conv2"], conv2)
    assert torch.equal(tap["features.relu1"], relu1)
    assert torch.equal(tap["classifier"], out)
    assert not torch.equal(manual, conv2)          # the tap is conv2's own output, not bn2's


def test_tap_hooks_are_removed_on_exit_and_on_error() -> None:
    model, x = _cnn(), _x()
    assert _hooks(model) == 0
    with FeatureTap(model, "features.conv1") as tap:
        assert _hooks(model) == 1 and tap.active
        model(x)
    assert _hooks(model) == 0 and not tap.active
    before = tap["features.conv1"]
    model(_x(seed=1))
    assert tap["features.conv1"] is before         # nothing captured after exit
    with pytest.raises(ValueError, match="boom"), FeatureTap(model, ["features.conv1",
                                                                    "classifier"]):
        raise ValueError("boom")
    assert _hooks(model) == 0


def test_tap_bad_name_is_a_one_line_error_with_close_names() -> None:
    model = _cnn()
    with pytest.raises(ModelError, match=r"'features\.cnv2'.*features\.conv2") as err:
        FeatureTap(model, ["features.conv1", "features.cnv2"])
    assert "\n" not in str(err.value)
    assert _hooks(model) == 0
    with FeatureTap(model, "features.conv1") as tap, pytest.raises(ModelError, match="no output"):
        tap["features.conv1"]


def test_tap_rnn_keeps_the_output_sequence() -> None:
    torch.manual_seed(0)
    model = models.build("gru", SHAPE, 10, hidden=12).eval()
    with torch.no_grad(), FeatureTap(model, "layers.0", detach=True) as tap:
        model(_x())
    assert tap["layers.0"].shape == (4, 40, 12)    # [B, L, H] (batch_first), not h_n


def test_channel_dims_from_layer_types() -> None:
    cnn = _cnn()
    assert channel_dim_of(cnn, "features.conv1") == 1
    assert channel_dim_of(cnn, "features.relu2") == 1           # from the layer before
    assert channel_dim_of(cnn, "features") == 1                 # from the layers inside
    torch.manual_seed(0)
    tr = models.build("transformer", SHAPE, 10, dim=16, depth=1, num_heads=2, head_dim=8,
                      mlp_dim=32)
    assert channel_dim_of(tr, "blocks.0") == -1
    assert channel_dim_of(tr, "blocks.0.ffn.act") == -1
    assert channel_dim_of(models.build("gru", SHAPE, 10, hidden=8), "layers.0") == -1
    assert channel_dim_of(models.build("rescnn", SHAPE, 10), "blocks.0") == 1


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 7), (3, 5, 4, 6)])
def test_adapter_maps_the_channel_dim_as_a_1x1_conv(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    adapter = Adapter(5, 9)
    x = torch.randn(shape)
    y = adapter(x)
    assert y.shape == (shape[0], 9, *shape[2:])
    w, b = adapter.proj.weight, adapter.proj.bias
    conv = {2: lambda: x @ w.T + b, 3: lambda: F.conv1d(x, w[..., None], b),
            4: lambda: F.conv2d(x, w[..., None, None], b)}[len(shape)]()
    assert torch.allclose(y, conv, atol=1e-6)


def test_adapter_channels_last_identity_and_errors() -> None:
    last = Adapter(5, 3, channel_dim=-1)
    assert last(torch.randn(2, 7, 5)).shape == (2, 7, 3)
    same = Adapter(5, 5)
    x = torch.randn(2, 5, 4)
    assert same(x) is x and not list(same.parameters())
    with pytest.raises(ModelError, match=r"\[2, 4, 5\]"):
        Adapter(5, 3)(torch.randn(2, 4, 5))
    with pytest.raises(RecipeError, match="in_features"):
        Adapter(0, 3)


def test_hint_loss_pools_to_the_smaller_size_and_adapts() -> None:
    torch.manual_seed(0)
    hint = HintLoss([("s", "t")], {"s": (8, 20)}, {"t": (16, 10)})
    s, t = torch.randn(4, 8, 20), torch.randn(4, 16, 10)
    (adapted, target), = hint.pair_features({"s": s}, {"t": t})
    assert adapted.shape == target.shape == (4, 16, 10)
    pooled = (s[..., 0::2] + s[..., 1::2]) / 2     # adaptive average pooling 20 -> 10
    assert torch.allclose(adapted, hint.adapters[0](pooled), atol=1e-6)
    assert torch.equal(target, t)
    with torch.no_grad():
        mse = float(hint({"s": s}, {"t": t}))
        angular = HintLoss([("s", "t")], {"s": (8, 20)}, {"t": (16, 10)}, loss="angular")
        ang = float(angular({"s": s}, {"t": t}))
    assert mse == pytest.approx(float(((adapted.detach() - t) ** 2).mean()))
    assert 0.0 < ang <= 4.0
    with pytest.raises(ModelError, match="spatial"):
        HintLoss([("s", "t")], {"s": (8, 20)}, {"t": (16, 4, 4)})
    with pytest.raises(RecipeError, match="hint loss"):
        HintLoss([("s", "t")], {"s": (8,)}, {"t": (8,)}, loss="l1")


def test_hint_loss_channels_last_student_against_channels_first_teacher() -> None:
    hint = HintLoss([("s", "t")], {"s": (10, 6)}, {"t": (12, 5)}, student_dims={"s": -1})
    (adapted, target), = hint.pair_features({"s": torch.randn(2, 10, 6)},
                                            {"t": torch.randn(2, 12, 5)})
    assert adapted.shape == target.shape == (2, 12, 5)   # student [B, L=10, C=6] -> [B, 6, 5]


def test_feature_distiller_trains_the_student_and_adapters_not_the_teacher() -> None:
    teacher, student = _cnn((8, 16, 32), seed=0), _cnn((4, 8, 8), seed=1)
    student.train()
    x = _x(16)
    fd = FeatureDistiller(student, teacher, {"features.relu2": "features.relu2",
                                             "features.relu3": "features.relu3"}, x[:2])
    assert [type(a.proj).__name__ for a in fd.hint_loss.adapters] == ["Linear", "Linear"]
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    opt = torch.optim.Adam(list(student.parameters()) + list(fd.parameters()), lr=1e-2)
    losses = []
    for _ in range(25):
        out = fd(x)
        opt.zero_grad()
        out.hint.backward()
        opt.step()
        losses.append(float(out.hint.detach()))
    assert out.student_out.shape == out.teacher_out.shape == (16, 10)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert _hooks(student) == 0 and _hooks(teacher) == 0


def test_feature_distiller_transformer_widths_and_perturb() -> None:
    torch.manual_seed(0)
    kw = {"depth": 1, "num_heads": 2, "head_dim": 8}
    teacher = models.build("transformer", SHAPE, 10, dim=32, mlp_dim=64, **kw).eval()
    student = models.build("transformer", SHAPE, 10, dim=16, mlp_dim=32, **kw)
    x = _x(3)
    fd = FeatureDistiller(student, teacher, [("blocks.0", "blocks.0")], x, loss="angular")
    assert fd.hint_loss.plans[0].student_dim == -1
    assert fd.hint_loss.adapters[0].proj.weight.shape == (32, 16)
    sevens = FeatureDistiller(student, teacher, [("blocks.0", "blocks.0")], x,
                              perturb=lambda f: torch.full_like(f, 7.0))
    with torch.no_grad():
        out = sevens(x)
        with FeatureTap(student, "blocks.0") as tap:
            student(x)
        adapted = sevens.hint_loss.adapters[0](tap["blocks.0"].movedim(-1, 1))
    assert adapted.shape == (3, 32, 10)
    assert float(out.hint) == pytest.approx(float(((adapted - 7.0) ** 2).mean()), rel=1e-5)
    assert 0.0 < float(fd(x).hint.detach()) <= 4.0
    with pytest.raises(ModelError, match=r"blocks\.9"):
        FeatureDistiller(student, teacher, [("blocks.9", "blocks.0")], x)


# ------------------------------------------------------------------ hints in a recipe

HINTED = """
name: hinted
distill: {hints: {features.conv2: features.conv2}, hint_loss: angular, hint_weight: 5}
stages:
  - technique: l1_filter_prune
    params: {ratio: 0.5, epochs_per_step: 0}
  - fine_tune: {epochs: 2, lr: 0.001}
"""


def _hint_run(text: str, **kw: object):
    import nncompress as nc
    from helpers import tiny_data
    from nncompress.recipe import Recipe

    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 12), 3)
    data = tiny_data(n=96)
    return nc.compress(model, Recipe.from_yaml(text), data, progress=False,
                       measure_latency=False, **kw)


def test_recipe_hints_train_every_stage_through_fresh_adapters(monkeypatch) -> None:
    """The fine_tune stage after pruning matches the pruned conv2 (32 channels) to the
    teacher's (64) through an adapter built for that stage; without hints the weights
    come out otherwise."""
    from nncompress.distill import features

    calls: list[tuple[int, int]] = []
    real = features.FeatureDistiller.forward

    def spy(self, x):
        out = real(self, x)
        calls.append((out.student_out.shape[0], len(list(self.parameters()))))
        return out

    monkeypatch.setattr(features.FeatureDistiller, "forward", spy)
    hinted = _hint_run(HINTED)
    assert any("feature hints (angular, weight 5): features.conv2 -> features.conv2" in line
               for line in hinted.log)
    assert len(calls) == 12 and all(n > 0 for _, n in calls)  # 2 epochs x 6 batches
    plain = _hint_run(HINTED.replace(
        "distill: {hints: {features.conv2: features.conv2}, hint_loss: angular, "
        "hint_weight: 5}", "distill: {}"))
    w_h, w_p = (r.model.features.conv3.weight for r in (hinted, plain))
    assert w_h.shape == w_p.shape and not torch.equal(w_h, w_p)


@pytest.mark.parametrize(("edit", "error", "words"), [
    ("features.conv2: features.conv2}", ModelError, "no layer 'features.conv9'"),
    ("hint_loss: angular", RecipeError, "hint_loss"),
    ("distill: {", RecipeError, "teacher is 'none'"),
])
def test_recipe_hint_errors_are_one_line_before_any_stage(edit: str, error: type, words: str,
                                                          monkeypatch) -> None:
    monkeypatch.setattr("nncompress.api.decompose", lambda *a: pytest.fail("a stage ran"))
    text = {
        "features.conv2: features.conv2}": HINTED.replace(
            "features.conv2: features.conv2}", "features.conv9: features.conv2}"),
        "hint_loss: angular": HINTED.replace("hint_loss: angular", "hint_loss: cubic"),
        "distill: {": HINTED.replace("distill: {", "distill: {teacher: none, "),
    }[edit]
    with pytest.raises(error) as info:
        _hint_run(text)
    assert words in str(info.value) and "\n" not in str(info.value)
