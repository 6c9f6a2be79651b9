"""Distillation students: width multipliers, shallow students, MobileNet / ShuffleNet
networks, sized by ``student_of``; they save, load, export and count MACs like every model."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import nncompress as nc
from nncompress import models
from nncompress.errors import ModelError
from nncompress.measure import count_macs
from nncompress.models import ARCHITECTURES, CNN1d
from nncompress.models.blocks import (
    ChannelShuffle,
    MobileNet1d,
    MobileNet2d,
    ShuffleNet1d,
    ShuffleNet2d,
    ShuffleUnit,
)
from nncompress.models.students import KINDS, scaled, student_of

SHAPES = {"mnist1d": (1, 40), "digits": (1, 8, 8)}
ALL = ("cnn1d", "cnn2d", "gru", "lstm", "mlp", "rescnn", "transformer")
EFFICIENT = {("cnn1d", "mobilenet"): MobileNet1d, ("cnn1d", "shufflenet"): ShuffleNet1d,
             ("cnn2d", "mobilenet"): MobileNet2d, ("cnn2d", "shufflenet"): ShuffleNet2d}


def _teacher(name: str) -> models.ArchModule:
    torch.manual_seed(0)
    return models.build(name, SHAPES[models.spec(name).default_dataset], 10)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kinds(name: str) -> tuple[str, ...]:
    return ("auto", "width", "shallow",
            *(k for (t, k) in EFFICIENT if t == name))


@pytest.mark.parametrize("name", ALL)
def test_every_kind_hits_the_size_and_shrinks_with_the_ratio(name: str) -> None:
    teacher = _teacher(name)
    total = _params(teacher)
    x = torch.randn(3, *SHAPES[models.spec(name).default_dataset])
    for kind in _kinds(name):
        sizes = []
        for ratio in (2, 4, 10):
            student = student_of(teacher, ratio, kind)
            n = _params(student)
            assert abs(n - total / ratio) <= 0.15 * total / ratio, (kind, ratio, n)
            assert student(x).shape == teacher(x).shape
            sizes.append(n)
        assert sizes[0] > sizes[1] > sizes[2], (kind, sizes)


@pytest.mark.parametrize(("name", "kind"), [("cnn1d", "mobilenet"), ("cnn2d", "shufflenet"),
                                            ("transformer", "width"), ("lstm", "shallow"),
                                            ("rescnn", "width")])
def test_a_larger_ratio_never_gives_more_parameters(name: str, kind: str) -> None:
    teacher = _teacher(name)
    ratios = [1.1 * 1.25 ** i for i in range(16)]       # 1.1 .. ~31
    sizes = [_params(student_of(teacher, r, kind, tolerance=1.0)) for r in ratios]
    assert all(a >= b for a, b in itertools.pairwise(sizes)), sizes
    assert sizes[0] > 4 * sizes[-1]


def test_the_search_gets_within_five_percent_on_the_reference_models() -> None:
    worst = 0.0
    for name in ALL:
        teacher = _teacher(name)
        for ratio in (2, 3, 4, 6, 10):
            target = _params(teacher) / ratio
            worst = max(worst, abs(_params(student_of(teacher, ratio, "width")) - target) / target)
    assert worst <= 0.05


def test_auto_picks_per_architecture() -> None:
    assert type(student_of(_teacher("cnn2d"), 4)) is MobileNet2d
    for name in ("gru", "lstm"):
        assert student_of(_teacher(name), 4).arch_config()["hidden"] == \
            student_of(_teacher(name), 4, "shallow").arch_config()["hidden"]
        assert len(student_of(_teacher(name), 4).arch_config()["hidden"]) == 1
    for name in ("cnn1d", "mlp", "rescnn", "transformer"):
        teacher = _teacher(name)
        assert student_of(teacher, 4).arch_config() == \
            student_of(teacher, 4, "width").arch_config()


def test_student_of_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    teacher = _teacher("cnn1d")
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = student_of(teacher, 4, "mobilenet", seed=7)
    after = torch.rand(3)
    b = student_of(teacher, 4, "mobilenet", seed=7)
    c = student_of(teacher, 4, "mobilenet", seed=8)
    assert torch.equal(before, after)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())


def test_scaled_halves_every_hidden_width() -> None:
    assert scaled(_teacher("mlp"), 0.5).arch_config()["hidden"] == [150, 50]
    assert scaled(_teacher("cnn1d"), 0.5).arch_config()["channels"] == [16, 32, 64]
    cfg = scaled(_teacher("cnn2d"), 0.5).arch_config()
    assert (cfg["channels"], cfg["hidden"]) == ([3, 8], [60, 42])
    assert scaled(_teacher("gru"), 0.5).arch_config()["hidden"] == [32, 32]
    cfg = scaled(_teacher("rescnn"), 0.5).arch_config()
    assert (cfg["channels"], cfg["hidden"]) == (16, [32, 32, 32])
    cfg = scaled(_teacher("transformer"), 0.5).arch_config()
    assert (cfg["dim"], cfg["num_heads"], cfg["head_dim"], cfg["mlp_dim"]) == \
        (32, [4, 4], [8, 8], [64, 64])
    wide = scaled(_teacher("cnn1d"), 2.0)
    assert wide.arch_config()["channels"] == [64, 128, 256]
    assert scaled(_teacher("mlp"), 1e-3).arch_config()["hidden"] == [1, 1]   # at least 1


def test_scaled_transformer_heads_always_divide_the_width() -> None:
    teacher = _teacher("transformer")
    x = torch.randn(2, 1, 40)
    for width in (0.07, 0.13, 0.3, 0.41, 0.77, 1.3):
        cfg = scaled(teacher, width).arch_config()
        for heads, head_dim in zip(cfg["num_heads"], cfg["head_dim"], strict=True):
            assert heads * head_dim == cfg["dim"] and heads >= 2
        assert scaled(teacher, width)(x).shape == (2, 10)


def test_an_embedder_student_keeps_the_embedding_width() -> None:
    try:
        teacher = models.build("transformer", (1, 40), 0)     # mean-pooled embedder
    except ModelError:
        pytest.skip("this checkout's transformer has no embedder form (num_classes=0)")
    total = _params(teacher)
    x = torch.randn(2, 1, 40)
    for kind in ("width", "shallow"):
        for ratio in (2, 4, 10):
            student = student_of(teacher, ratio, kind)
            assert student(x).shape == teacher(x).shape == (2, 64)
            assert abs(_params(student) - total / ratio) <= 0.15 * total / ratio


def test_scaled_drops_layers() -> None:
    assert scaled(_teacher("gru"), 1.0, layers=1).arch_config()["hidden"] == [64]
    cfg = scaled(_teacher("transformer"), 0.5, layers=1).arch_config()
    assert cfg["depth"] == 1 and cfg["mlp_dim"] == [64]
    cfg = scaled(student_of(_teacher("cnn1d"), 2, "shufflenet"), 1.0, layers=3).arch_config()
    assert len(cfg["channels"]) == 3 and len(cfg["mid"]) == 2
    student = student_of(_teacher("lstm"), 4, "shallow")
    assert len(student.arch_config()["hidden"]) == 1


def test_a_pruned_teacher_is_scaled_from_its_own_widths() -> None:
    pruned = models.build("cnn1d", (1, 40), 10, channels=[20, 40, 100])
    assert scaled(pruned, 0.5).arch_config()["channels"] == [10, 20, 50]


def test_students_of_students() -> None:
    mobile = student_of(_teacher("cnn1d"), 2, "mobilenet")
    smaller = student_of(mobile, 2)                  # auto on a MobileNet: its width
    assert type(smaller) is MobileNet1d
    assert abs(_params(smaller) - _params(mobile) / 2) <= 0.15 * _params(mobile) / 2


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).reshape(1, 6, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert ChannelShuffle(3)(x).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    y = torch.randn(2, 8, 3, 3)
    assert torch.equal(ChannelShuffle(2, 2)(ChannelShuffle(4, 2)(y)), y)      # inverse pair


def test_shuffle_unit_shortcuts_and_shapes() -> None:
    x = torch.randn(2, 8, 10)
    same = ShuffleUnit(1, 8, 8, 4, 2, 3, 1)
    grow = ShuffleUnit(1, 8, 16, 4, 2, 3, 2)
    odd = ShuffleUnit(1, 8, 12, 4, 2, 3, 1)
    assert (same.shortcut, grow.shortcut, odd.shortcut) == ("add", "concat", "none")
    assert same(x).shape == (2, 8, 10)
    assert grow(x).shape == (2, 16, 5) and grow.gconv2.out_channels == 8
    assert odd(x).shape == (2, 12, 10)
    assert grow.gconv1.groups == 2 and grow.depthwise.groups == 4
    with pytest.raises(ModelError, match="mid width 5"):
        ShuffleUnit(1, 8, 8, 5, 2, 3, 1)


@pytest.mark.parametrize("cls", [MobileNet1d, MobileNet2d, ShuffleNet1d, ShuffleNet2d])
def test_efficient_classes_rebuild_from_their_config(cls: type) -> None:
    shape = (1, 40) if cls.dims == 1 else (1, 8, 8)
    model = cls(shape, 10)
    assert ARCHITECTURES.get(cls.arch_name) is cls
    rebuilt = cls(**model.arch_config())
    assert rebuilt.arch_config() == model.arch_config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, eval mode."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize(("name", "kind"), sorted(EFFICIENT))
def test_efficient_students_save_load_export(name: str, kind: str, tmp_path) -> None:
    student = _trained_bn(student_of(_teacher(name), 4, kind))
    assert type(student) is EFFICIENT[name, kind]
    x = torch.randn(4, *SHAPES[models.spec(name).default_dataset],
                    generator=torch.Generator().manual_seed(1))
    nc.save(student, tmp_path / "s.nnc")
    loaded = nc.load(tmp_path / "s.nnc").eval()
    assert type(loaded) is type(student)
    with torch.no_grad():
        want = student(x)
        assert torch.equal(loaded(x), want)
    nc.export(student, tmp_path / "s.onnx", x)
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    ops = {node.op_type for node in graph.node}
    if kind == "shufflenet":
        assert "Transpose" in ops                 # the channel shuffle survived
    session = ort.InferenceSession(str(tmp_path / "s.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    macs = count_macs(student, x)
    depthwise = [layer for layer in macs.layers if layer.name.endswith("depthwise")]
    assert depthwise and macs.total > sum(layer.macs for layer in depthwise) > 0


@pytest.mark.parametrize("cls", [ShuffleNet1d, ShuffleNet2d, MobileNet1d])
def test_efficient_students_convert_to_int8(cls: type) -> None:
    from helpers import fold_on
    from nncompress.quant.convert import convert
    from nncompress.quant.reference import run

    shape = (1, 12) if cls.dims == 1 else (1, 8, 8)
    torch.manual_seed(0)
    extra = {"mid": [2, 2], "stride": [1, 2, 1]} if cls.arch_name.startswith("shuffle") else {}
    model = _trained_bn(cls(shape, 3, channels=[4, 8, 8], **extra))
    g = torch.Generator().manual_seed(3)
    calibration = [torch.randn((16, *shape), generator=g) for _ in range(2)]
    fold_on(model, calibration[0])
    program, _ = convert(model, calibration)
    with torch.no_grad():
        want = model(calibration[1])
    got = run(program, calibration[1])[0]
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


class _NotReference(CNN1d):
    """A user subclass: same arch_name as cnn1d, but not the registered class."""


def test_refusals_are_one_line_and_name_the_value() -> None:
    teacher = _teacher("cnn1d")
    cases = [
        (lambda: student_of(nn.Linear(4, 2)), "Linear"),
        (lambda: scaled(nn.Sequential(nn.Linear(4, 2))), "Sequential"),
        (lambda: student_of(_NotReference((1, 40), 10)), "_NotReference"),
        (lambda: student_of(teacher, 1.0), "1.0"),
        (lambda: student_of(teacher, 0.5), "0.5"),
        (lambda: student_of(teacher, True), "True"),
        (lambda: student_of(teacher, float("nan")), "nan"),
        (lambda: student_of(teacher, 4, "tiny"), "'tiny'"),
        (lambda: student_of(_teacher("gru"), 4, "mobilenet"), "gru"),
        (lambda: student_of(_teacher("rescnn"), 4, "shufflenet"), "rescnn"),
        (lambda: student_of(teacher, 1e6), "1e+06"),
        (lambda: scaled(teacher, 0), "0"),
        (lambda: scaled(teacher, -1.0), "-1.0"),
        (lambda: scaled(teacher, 0.5, layers=4), "4"),
        (lambda: scaled(teacher, 0.5, layers=0), "0"),
    ]
    for call, named in cases:
        with pytest.raises(ModelError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and named in message, message


def test_a_target_off_the_steps_or_below_the_smallest_is_refused() -> None:
    mlp = models.build("mlp", (1, 2), 2, hidden=[4])    # 5 * hidden + 2: 7, 12, 17, 22
    with pytest.raises(ModelError, match=r"nearest MLP student has 7 parameters, not within 15%"):
        student_of(mlp, 22 / 9.5)        # 9.5: 7 and 12 both 26% off (a tie: the smaller)
    assert _params(student_of(mlp, 22 / 12)) == 12
    with pytest.raises(ModelError, match="the smallest such student has 7"):
        student_of(mlp, 22 / 6)


def test_kinds_are_listed() -> None:
    assert KINDS == ("auto", "width", "shallow", "mobilenet", "shufflenet")
