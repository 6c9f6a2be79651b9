"""FSKD (Li, Li, Liu & Zhang, 2020): the merge is exact, the fit repairs a pruned model
from unlabelled inputs, and what it cannot handle is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import nncompress as nc
from nncompress import models
from nncompress.data import unlabelled
from nncompress.distill.fskd import (
    FSKDConfig,
    fit_pointwise,
    fskd,
    match_channels,
    merge_pointwise,
)
from nncompress.errors import ConstraintError, RecipeError, UnsupportedLayerError
from nncompress.prune.filter_l1 import L1FilterPruneConfig, l1_filter_prune
from nncompress.recipe import Recipe, Stage
from nncompress.technique import TECHNIQUES, Context


def _pair_close(layer: nn.Module, q: nn.Module, x: torch.Tensor) -> None:
    merged = merge_pointwise(layer, q)
    with torch.no_grad():
        want = q(layer(x))
        got = merged(x)
    assert type(merged) is type(layer)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_merged_layer_equals_the_unmerged_pair(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = nn.Conv1d(3, 6, 5, stride=2, padding=2, dilation=1)
        q, x = nn.Conv1d(6, 4, 1), torch.randn(2, 3, 17)
    elif kind == "conv2d":
        layer = nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1))
        q, x = nn.Conv2d(6, 6, 1), torch.randn(2, 3, 9, 11)
    else:
        layer, q, x = nn.Linear(7, 6), nn.Linear(6, 5), torch.randn(4, 3, 7)
    _pair_close(layer, q, x)
    before = layer.weight.detach().clone()
    merge_pointwise(layer, q)
    assert torch.equal(layer.weight, before)  # the input layer is left as it was


def test_merge_of_a_matrix_and_offset_and_into_a_bias_free_layer() -> None:
    torch.manual_seed(1)
    layer = nn.Conv1d(2, 5, 3, padding=1, bias=False)
    q, c, x = torch.randn(5, 5), torch.randn(5), torch.randn(3, 2, 8)
    merged = merge_pointwise(layer, q, c)
    with torch.no_grad():
        want = torch.einsum("oc,bcl->bol", q, layer(x)) + c.view(1, -1, 1)
        assert torch.allclose(merged(x), want, atol=1e-5, rtol=0)
    no_offset = merge_pointwise(layer, q)
    assert no_offset.bias is None  # neither has a bias: the merged layer has none either


def test_merge_refuses_what_is_not_a_pointwise_map() -> None:
    with pytest.raises(UnsupportedLayerError, match="not a pointwise map"):
        merge_pointwise(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3))
    with pytest.raises(UnsupportedLayerError, match="groups=1"):
        merge_pointwise(nn.Conv1d(4, 4, 3, groups=2), torch.eye(4))
    with pytest.raises(ConstraintError, match="does not map"):
        merge_pointwise(nn.Linear(3, 4), torch.eye(5))


def test_fit_recovers_an_exact_affine_map() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(200, 6, generator=g, dtype=torch.float64)
    q0, c0 = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                              dtype=torch.float64)
    q, c = fit_pointwise(s, s @ q0.T + c0, 0.0, offset=True)
    assert c is not None
    assert torch.allclose(q, q0, atol=1e-6) and torch.allclose(c, c0, atol=1e-6)
    q_damped, _ = fit_pointwise(s, s @ q0.T, 1e6, offset=False)
    assert torch.allclose(q_damped, torch.eye(6, dtype=torch.float64), atol=1e-3)


def test_channels_are_matched_to_the_teacher_channels_they_came_from() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(300, 10, generator=g)
    kept = [1, 4, 5, 8]
    idx, corr = match_channels(t[:, kept] + 0.3 * torch.randn(300, 4, generator=g), t)
    assert idx == kept
    assert 0.9 < corr < 1.0


def _teacher_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    teacher = models.build("cnn1d", (1, 24), 5, channels=[8, 16, 16])
    x = torch.randn(160, 1, 24)
    teacher.train()
    with torch.no_grad():  # realistic BatchNorm statistics for a random teacher
        for _ in range(5):
            teacher(x)
    return teacher.eval(), x


def _pruned(teacher: nn.Module, data_x: torch.Tensor) -> tuple[nn.Module, Context]:
    data = unlabelled(data_x[:120], data_x[120:], batch_size=16)
    ctx = Context(data=data, progress=False)
    student = l1_filter_prune(copy.deepcopy(teacher),
                              L1FilterPruneConfig(ratio=0.5, epochs_per_step=0), ctx)
    return student.eval(), ctx


def _logit_mse(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((a(x) - b(x)) ** 2).mean())


def test_fskd_brings_a_pruned_model_closer_to_its_teacher_from_unlabelled_batches() -> None:
    teacher, x = _teacher_and_data()
    student, ctx = _pruned(teacher, x)
    assert student.features.conv2.out_channels < teacher.features.conv2.out_channels
    ctx.teacher = teacher
    held_out = x[120:]
    before = _logit_mse(student, teacher, held_out)
    batch = next(iter(ctx.data.train))
    assert batch[1] is None  # the technique sees (x, None) batches only
    out = TECHNIQUES.get("fskd").apply(student, FSKDConfig(samples=40), ctx)
    after = _logit_mse(out, teacher, held_out)
    assert out is student
    assert after < 0.5 * before
    assert student.features.conv2.out_channels == 8  # no growth
    assert any("fitting on 40 training inputs" in line for line in ctx.log)
    assert sum(line.startswith("fskd: features.conv") for line in ctx.log) == 3


def test_fskd_callable_directly_with_a_train_teacher_object() -> None:
    from nncompress.train import Teacher

    teacher, x = _teacher_and_data(1)
    student, ctx = _pruned(teacher, x)
    ctx.teacher = Teacher(model=teacher, loss=lambda s, t, y: ((s - t) ** 2).mean())
    before = _logit_mse(student, teacher, x[120:])
    again = copy.deepcopy(student)
    TECHNIQUES.get("fskd").apply(student, FSKDConfig(samples=40, ridge=0.0), ctx)
    lines: list[str] = []
    fskd(again, teacher, x[:40], ridge=0.0, note=lines.append)
    assert _logit_mse(student, teacher, x[120:]) < before
    assert len(lines) == 4  # conv1..3 and the classifier, one line each


class _Calls(nn.Module):
    """Registers ``second`` before ``first`` but calls ``first`` first; two inputs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.second = nn.Linear(width, 3)
        self.first = nn.Linear(6, width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(torch.cat([a, b], dim=1))))


def test_layers_are_fitted_in_call_order_on_tuple_inputs() -> None:
    torch.manual_seed(4)
    teacher, student = _Calls(8), _Calls(5)
    x = (torch.randn(50, 3), torch.randn(50, 3))
    lines: list[str] = []
    fskd(student, teacher, x, note=lines.append)
    assert [line.split(":")[1].strip() for line in lines] == ["first", "second"]
    assert "5 of 8 teacher channels" in lines[0]


def test_other_layers_are_left_alone_by_name_and_a_model_with_nothing_to_fit_is_refused(
        ) -> None:
    """A grouped conv, a GRU, a LayerNorm, a layer called twice: no map after them (named
    in the log); the Conv / Linear layers around them are still fitted. A model with no
    fittable layer is refused in one line before anything changes."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(),
                            nn.Linear(16, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(64, 1, 8)
    before = _logit_mse(student, teacher, x)
    lines: list[str] = []
    fskd(student, teacher, x, note=lines.append)
    assert lines[0] == ("fskd: left as they are (no map fitted after them): "
                        "1 (Conv1d groups=2), 4 (LayerNorm)")
    assert [line.split(":")[1].strip() for line in lines[1:]] == ["0", "3", "5"]
    assert _logit_mse(student, teacher, x) < before
    gru = nn.Module()
    gru.rnn = nn.GRU(3, 4)
    state = copy.deepcopy(gru.state_dict())
    with pytest.raises(UnsupportedLayerError) as info:
        fskd(gru, gru, torch.randn(2, 5, 3))
    assert str(info.value) == ("fskd: nothing to fit in the Module: no Conv1d / Conv2d "
                               "(groups=1) or Linear runs once per forward (left alone: "
                               "rnn (GRU))")
    assert all(torch.equal(v, gru.state_dict()[k]) for k, v in state.items())


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


def test_a_layer_called_twice_is_left_alone() -> None:
    torch.manual_seed(1)
    teacher, student = _Twice(), _Twice()
    lines: list[str] = []
    fskd(student, teacher, torch.randn(32, 4), note=lines.append)
    assert "inner (called more than once per forward)" in lines[0]
    assert [line.split(":")[1].strip() for line in lines[1:]] == ["head"]


def test_layers_without_a_teacher_counterpart_are_refused() -> None:
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(UnsupportedLayerError, match=r"0 \(student 9 vs teacher 6"):
        fskd(wider, teacher, torch.randn(8, 4))
    renamed = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Linear(2, 2))
    with pytest.raises(UnsupportedLayerError, match=r"3 \(Linear vs missing\)"):
        fskd(renamed, teacher, torch.randn(8, 4))


def test_no_teacher_is_a_one_line_recipe_error() -> None:
    teacher, x = _teacher_and_data()
    student, ctx = _pruned(teacher, x)
    with pytest.raises(RecipeError, match="fskd needs a teacher") as err:
        TECHNIQUES.get("fskd").apply(student, FSKDConfig(), ctx)
    assert "\n" not in str(err.value)


def test_pruned_connections_are_refused() -> None:
    teacher, x = _teacher_and_data()
    student, ctx = _pruned(teacher, x)
    ctx.teacher = teacher
    ctx.masks["features.conv2.weight"] = student.features.conv2.weight != 0
    with pytest.raises(RecipeError, match=r"features\.conv2\.weight"):
        TECHNIQUES.get("fskd").apply(student, FSKDConfig(), ctx)


def test_config_and_registration() -> None:
    assert TECHNIQUES.get("fskd").category == "knowledge-distillation"
    assert FSKDConfig().samples == 40 and FSKDConfig().teacher == "original"
    for bad in ({"samples": 0}, {"ridge": -1.0}, {"teacher": "none"}):
        with pytest.raises(ValidationError):
            FSKDConfig(**bad)


@pytest.mark.parametrize("arch", ["encoder", "bigru"])
def test_fskd_through_compress_on_pytorch_built_in_transformer_and_rnn(arch: str) -> None:
    """nn.TransformerEncoder (rewritten by compress; the teacher gets the same rewrite so
    q/k/v/out projections pair by name) and a bidirectional GRU + LayerNorm (left alone,
    named in the log): FSKD after pruning brings the outputs closer to the teacher's."""
    from nncompress.models.plain import BiGRU, Encoder

    torch.manual_seed(0)
    teacher = (Encoder(dim=32) if arch == "encoder" else BiGRU()).eval()
    x = torch.randn(160, 1, 40)
    data = unlabelled(x[:120], x[120:], batch_size=20)
    prune = Stage.technique("l1_filter_prune", ratio=0.4, epochs_per_step=0)
    runs = {}
    for name, stages in (("pruned", (prune,)), ("fskd", (prune, Stage.technique("fskd")))):
        runs[name] = nc.compress(teacher, Recipe(name, stages), data, progress=False,
                                 measure_latency=False, metric="mse")
    log = "\n".join(runs["fskd"].log)
    if arch == "encoder":
        assert "fskd: encoder.layers.0.self_attn.q_proj:" in log
    else:
        assert "fskd: left as they are (no map fitted after them): rnn (GRU), norm (LayerNorm)" \
            in log
    held = x[120:]
    assert _logit_mse(runs["fskd"].model, teacher, held) < \
        0.7 * _logit_mse(runs["pruned"].model, teacher, held)
