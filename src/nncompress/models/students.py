"""Student builders for knowledge distillation: width multipliers, fewer layers, and
efficient-block students, sized to a parameter budget.

- :func:`scaled`: a freshly initialised model of the same class as a reference model with
  every hidden width multiplied by ``width`` (the width multiplier of Howard et al.,
  "MobileNets", 2017), optionally keeping only its first ``layers`` layers;
- :func:`student_of`: a fresh student with ~1/``size_ratio`` of the teacher's parameters,
  found by bisection on the width multiplier, built as a width-scaled copy, a shallower
  copy, or a MobileNet / ShuffleNet network (:mod:`nncompress.models.blocks`) for the CNNs.

Which config entries are widths, which are stacked layers, and which efficient network
replaces a CNN live in one table per fact (``_RULES``, ``_CONVERSIONS``, ``_AUTO``).
A model that is not one of these exact classes gets a ``width`` student from its
structured-pruning groups instead (:mod:`nncompress.models.narrowed`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ARCHITECTURES, ArchModule
from nncompress.models.blocks import MobileNet1d, MobileNet2d, ShuffleNet1d, ShuffleNet2d

__all__ = ["KINDS", "scaled", "student_of"]

Config = dict[str, Any]
Scale = Callable[[int], int]          # one base width -> its scaled width (>= 1)

#: student kinds :func:`student_of` builds
KINDS = ("auto", "width", "shallow", "mobilenet", "shufflenet")
_W_MIN, _W_MAX, _STEPS = 1e-4, 4096.0, 40


def _lists(cfg: Config, f: Scale, *keys: str) -> Config:
    """``cfg`` with every width of the per-layer lists (or single ints) ``keys`` scaled."""
    out = dict(cfg)
    for key in keys:
        value = cfg[key]
        out[key] = f(value) if isinstance(value, int) else [f(v) for v in value]
    return out


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _transformer(cfg: Config, f: Scale) -> Config:
    """``dim`` and ``mlp_dim`` scaled, ``dim`` to a multiple of ``m`` = half the most heads
    of any block; each block's attention width ``heads * head_dim`` follows ``dim`` when it
    equals it (else scales on its own, also to a multiple of ``m``), with the most heads (at
    most the block's own) that divide it: at least ``m`` where the block had ``2m``. An
    embedder (``num_classes`` 0: the output is the pooled ``[B, dim]``) keeps ``dim`` so the
    student's embeddings compare with the teacher's; its attention widths scale instead.
    Parameters depend on the widths only, so they grow with the multiplier."""
    m = max(1, max(cfg["num_heads"], default=2) // 2)

    def fm(c: int) -> int:
        return m * max(1, f(c) // m + (f(c) % m * 2 >= m))

    embedder = cfg.get("num_classes") == 0
    dim = cfg["dim"] if embedder else fm(cfg["dim"])
    heads, head_dims = [], []
    for h, d in zip(cfg["num_heads"], cfg["head_dim"], strict=True):
        inner = dim if h * d == cfg["dim"] and not embedder else fm(h * d)
        heads.append(_largest_divisor(inner, h))
        head_dims.append(inner // heads[-1])
    return {**_lists(cfg, f, "mlp_dim"), "dim": dim, "num_heads": heads, "head_dim": head_dims}


def _shufflenet(cfg: Config, f: Scale) -> Config:
    """Widths rounded to multiples of ``groups``; a stride-1 unit that kept its width keeps
    it (identity shortcut), a strided unit grows by >= ``groups`` (concat shortcut), so the
    shortcut structure, and hence parameters vs width, stay monotone."""
    g = cfg["groups"]

    def fg(c: int) -> int:
        return g * max(1, f(c) // g + (f(c) % g * 2 >= g))

    base, strides = cfg["channels"], cfg["stride"]
    widths = [fg(base[0])]
    for i in range(1, len(base)):
        if strides[i] == 1 and base[i] == base[i - 1]:
            widths.append(widths[-1])
        else:
            widths.append(max(fg(base[i]), widths[-1] + g if strides[i] > 1 else g))
    return {**cfg, "channels": widths, "mid": [fg(m) for m in cfg["mid"]]}


@dataclass(frozen=True)
class _Rule:
    """How one architecture shrinks: ``widths(cfg, scale)`` scales its hidden widths;
    ``stack`` names the per-layer config lists cut together to drop layers (with how many
    entries fewer than layers each has) and ``depth`` an int entry set to the layer count."""

    widths: Callable[[Config, Scale], Config]
    stack: tuple[tuple[str, int], ...]
    depth: str | None = None


def _keys(*keys: str) -> Callable[[Config, Scale], Config]:
    return lambda cfg, f: _lists(cfg, f, *keys)


_CNN_STACK = (("channels", 0), ("stride", 0))
_RULES: Mapping[str, _Rule] = MappingProxyType({
    "mlp": _Rule(_keys("hidden"), (("hidden", 0),)),
    "gru": _Rule(_keys("hidden"), (("hidden", 0),)),
    "lstm": _Rule(_keys("hidden"), (("hidden", 0),)),
    "cnn1d": _Rule(_keys("channels"), (("channels", 0),)),
    "cnn2d": _Rule(_keys("channels", "hidden"), (("hidden", 0),)),
    "rescnn": _Rule(_keys("channels", "hidden"), (("hidden", 0),)),
    "transformer": _Rule(_transformer, (("num_heads", 0), ("head_dim", 0), ("mlp_dim", 0)),
                         depth="depth"),
    "mobilenet1d": _Rule(_keys("channels"), _CNN_STACK),
    "mobilenet2d": _Rule(_keys("channels"), _CNN_STACK),
    "shufflenet1d": _Rule(_shufflenet, (*_CNN_STACK, ("mid", 1))),
    "shufflenet2d": _Rule(_shufflenet, (*_CNN_STACK, ("mid", 1))),
})


def _mobilenet_of(cfg: Config, cls: type[ArchModule], extra: bool) -> tuple[type, Config]:
    """A CNN's conv widths as a MobileNet: the stem at the first width and stride, one
    depthwise-separable block per further conv (same stride). A 2-D teacher (stride-1
    convs + 2x max pools + a fully connected head) gets stride-1 stem, stride-2 blocks and
    one extra block at twice the last width standing in for the head."""
    channels = list(cfg["channels"])
    if extra:
        channels.append(2 * channels[-1])
        strides = [1] + [2] * (len(channels) - 1)
    else:
        strides = [cfg["stride"]] * len(channels)
    return cls, {"input_shape": cfg["input_shape"], "num_classes": cfg["num_classes"],
                 "channels": channels, "kernel_size": cfg["kernel_size"], "stride": strides}


def _shufflenet_of(cfg: Config, cls: type[ArchModule], extra: bool) -> tuple[type, Config]:
    """A CNN's conv widths as a ShuffleNet (groups 2): the stem as for MobileNet, then per
    further conv one strided unit and one identity-shortcut unit of the same width, with
    bottlenecks of a quarter of the unit's width (Zhang et al. 2018)."""
    _, mobile = _mobilenet_of(cfg, cls, extra)
    channels, strides = [mobile["channels"][0]], [mobile["stride"][0]]
    for c, s in zip(mobile["channels"][1:], mobile["stride"][1:], strict=True):
        channels += [c, c]
        strides += [s, 1]
    mids = [max(1, c // 4) for c in channels[1:]]
    return cls, {**mobile, "channels": channels, "stride": strides, "mid": mids, "groups": 2}


_CONVERSIONS: Mapping[tuple[str, str], Callable[[Config], tuple[type, Config]]] = \
    MappingProxyType({
        ("cnn1d", "mobilenet"): lambda c: _mobilenet_of(c, MobileNet1d, False),
        ("cnn1d", "shufflenet"): lambda c: _shufflenet_of(c, ShuffleNet1d, False),
        ("cnn2d", "mobilenet"): lambda c: _mobilenet_of(c, MobileNet2d, True),
        ("cnn2d", "shufflenet"): lambda c: _shufflenet_of(c, ShuffleNet2d, True),
        ("mobilenet1d", "mobilenet"): lambda c: (MobileNet1d, c),
        ("mobilenet2d", "mobilenet"): lambda c: (MobileNet2d, c),
        ("shufflenet1d", "shufflenet"): lambda c: (ShuffleNet1d, c),
        ("shufflenet2d", "shufflenet"): lambda c: (ShuffleNet2d, c),
    })

#: the kind ``kind="auto"`` builds, per architecture (default "width"); measured on
#: mnist1d / digits, see :func:`student_of`
_AUTO: Mapping[str, str] = MappingProxyType({"cnn2d": "mobilenet", "gru": "shallow",
                                             "lstm": "shallow"})


def _reference(model: nn.Module) -> tuple[str, Config]:
    """``(arch_name, arch_config())`` of a model this module can shrink, else ModelError."""
    name = getattr(type(model), "arch_name", None)
    if not (isinstance(model, ArchModule) and name in _RULES and name in ARCHITECTURES
            and ARCHITECTURES.get(name) is type(model)):
        raise ModelError(f"cannot build a student of a {type(model).__name__}: only the "
                         f"reference models and efficient students ({', '.join(_RULES)}) "
                         "have width rules")
    return name, model.arch_config()


def _layer_count(rule: _Rule, cfg: Config) -> int:
    key, fewer = rule.stack[0]
    return len(cfg[key]) + fewer


def _shallow(rule: _Rule, cfg: Config, layers: int) -> Config:
    out = {key: list(cfg[key])[:max(0, layers - fewer)] for key, fewer in rule.stack}
    if rule.depth is not None:
        out[rule.depth] = layers
    return {**cfg, **out}


def _scale_fn(width: float) -> Scale:
    return lambda c: max(1, math.floor(c * width + 0.5))


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) \
            or not math.isfinite(width) or width <= 0:
        raise ModelError(f"width multiplier must be a positive number, got {width!r}")
    return float(width)


def _build(cls: type, cfg: Config, seed: int, like: nn.Module) -> ArchModule:
    """``cls(**cfg)`` initialised from ``seed`` (torch's global RNG left as it was), on the
    device of ``like``'s parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**cfg)
    device = next((p.device for p in like.parameters()), torch.device("cpu"))
    return model.to(device)


def scaled(model: nn.Module, width: float = 0.5, *, layers: int | None = None,
           seed: int = 0) -> ArchModule:
    """A freshly initialised model of ``model``'s class with every hidden width times
    ``width`` (rounded, at least 1; input shape and classes kept), built from
    ``model.arch_config()`` (so a pruned model's own widths are the base).

    ``layers`` keeps only the first ``layers`` layers of the model's stack (hidden layers
    of mlp / gru / lstm, conv stages of cnn1d, fully connected layers of cnn2d, blocks of
    rescnn / transformer / the efficient students). Transformer blocks keep as many heads
    as divide their attention width (at most the teacher's); ShuffleNet widths stay
    multiples of its groups. Weights are initialised from ``seed``.
    """
    name, cfg = _reference(model)
    rule = _RULES[name]
    w = _check_width(width)
    if layers is not None:
        count = _layer_count(rule, cfg)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= count:
            raise ModelError(f"layers must be an integer from 1 to {count} for this {name}, "
                             f"got {layers!r}")
        cfg = _shallow(rule, cfg, layers)
    return _build(type(model), rule.widths(cfg, _scale_fn(w)), seed, model)


def _count(cls: type, cfg: Config) -> int:
    """Parameters of ``cls(**cfg)``, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**cfg).parameters())


def _search(make: Callable[[float], Config], cls: type, target: float, what: str) -> Config:
    """The config of the width multiplier whose parameter count is closest to ``target``:
    bisection (in log space) for the jump of the monotone step function params(width)
    across ``target``, then the nearer of the two counts beside it (ties: the smaller)."""
    counts: dict[str, int] = {}

    def count(w: float) -> int:
        key = json.dumps(make(w), sort_keys=True)
        if key not in counts:
            counts[key] = _count(cls, make(w))
        return counts[key]

    lo, hi = _W_MIN, 1.0
    if count(lo) > target:
        raise ModelError(f"{what} asks for {target:.0f} parameters, but the smallest such "
                         f"student has {count(lo)}")
    while count(hi) <= target:
        if hi >= _W_MAX:
            raise ModelError(f"{what} asks for {target:.0f} parameters, more than a "
                             f"{_W_MAX:g}x wider student has")
        hi *= 2.0
    for _ in range(_STEPS):
        mid = math.sqrt(lo * hi)
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return make(lo) if target - count(lo) <= count(hi) - target else make(hi)


def _base(model: nn.Module, kind: str) -> tuple[type, Config, _Rule]:
    """The student class, its unscaled config and width rule for ``kind``."""
    name, cfg = _reference(model)
    if kind not in KINDS:
        raise ModelError(f"unknown student kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "auto":
        kind = _AUTO.get(name, "width")
    if kind in ("width", "shallow"):
        rule = _RULES[name]
        if kind == "shallow":
            cfg = _shallow(rule, cfg, math.ceil(_layer_count(rule, cfg) / 2))
        return type(model), cfg, rule
    if (name, kind) not in _CONVERSIONS:
        cnns = sorted({teacher for teacher, k in _CONVERSIONS if k == kind})
        raise ModelError(f"student kind {kind!r} needs a teacher of {', '.join(cnns)}, "
                         f"got a {name}")
    cls, base = _CONVERSIONS[name, kind](cfg)
    return cls, base, _RULES[cls.arch_name]


def _is_reference(model: nn.Module) -> bool:
    try:
        _reference(model)
    except ModelError:
        return False
    return True


def student_of(model: nn.Module, size_ratio: float = 4.0, kind: str = "auto", seed: int = 0,
               *, tolerance: float = 0.15, example_input: Any = None,
               note: Callable[[str], None] | None = None) -> nn.Module:
    """A freshly initialised student with ~``1 / size_ratio`` of ``model``'s parameters.

    ``kind``: ``"width"`` (the same class, every hidden width scaled), ``"shallow"`` (the
    first half of the layers, rounded up, then widths scaled: 1 GRU / LSTM layer,
    1 transformer block, 1 hidden layer ...), ``"mobilenet"`` / ``"shufflenet"``
    (:mod:`~nncompress.models.blocks` networks, for cnn1d / cnn2d teachers and for such
    students themselves), ``"auto"``: mobilenet for cnn2d, shallow for gru / lstm, width
    for the rest. Why, from labels at the teacher's epochs and learning rate on its
    dataset (test accuracy at 4x / 10x fewer parameters, mean of 2 seeds unless noted):
    cnn2d (digits) width .921 / .889, shallow .960 / .904, mobilenet .975 / .967,
    shufflenet .967 / .925 -- its parameters sit in a fully connected head that a
    global-pooled MobileNet does without; cnn1d (mnist1d) width .930 / .917, shallow
    .938 / .915, mobilenet .923 / .879, shufflenet .910 / .919 -- width is as good as any
    and keeps the teacher's layers one to one (for hint distillation); gru width .904 /
    .779, shallow .953 / .833; lstm width .946 / .898, shallow .951 / .907 (one wider
    layer, also half the sequential steps); transformer (1 seed) width .869 / .857,
    shallow .839 / .834.

    The width multiplier is found by bisection on the parameter count (monotone in the
    multiplier); the student has the count nearest the target among the multipliers, and
    is refused unless within ``tolerance`` of it (every reference model at its default
    widths, size_ratio 2 to 10: within 5%, most within 1%). Deterministic (``seed``
    initialises the weights; torch's global RNG is left as it was) and monotone: for a
    given model and kind, a larger ``size_ratio`` never gives more parameters.

    Any other model (a user's network, PyTorch's own ``nn.TransformerEncoder``, stacked
    or bidirectional RNNs, grouped CNNs) gets a ``"width"`` student (also its ``"auto"``)
    from the structured-pruning graph: :func:`~nncompress.models.narrowed.narrowed_student`
    narrows every prunable channel group by one fraction and re-initialises, which needs
    ``example_input`` (a batch the model accepts) to trace the groups; ``note`` receives
    what that analysis leaves alone.

    Raises :class:`ModelError` (one line) for ``size_ratio <= 1``, an unknown or
    inapplicable kind (checked first), a model that is not a reference model given no
    ``example_input``, or a target below the smallest student of that kind (all widths 1).
    """
    if isinstance(size_ratio, bool) or not isinstance(size_ratio, (int, float)) \
            or not math.isfinite(size_ratio) or size_ratio <= 1:
        raise ModelError(f"size_ratio must be a number > 1, got {size_ratio!r}")
    if not _is_reference(model):
        return _other_model(model, size_ratio, kind, seed, tolerance, example_input, note)
    cls, base, rule = _base(model, kind)
    teacher = sum(p.numel() for p in model.parameters())
    target = teacher / size_ratio
    what = f"size_ratio {size_ratio:g} of a {teacher}-parameter {type(model).__name__}"
    cfg = _search(lambda w: rule.widths(base, _scale_fn(w)), cls, target, what)
    got = _count(cls, cfg)
    if abs(got - target) > tolerance * target:
        raise ModelError(f"{what}: the nearest {cls.__name__} student has {got} parameters, "
                         f"not within {tolerance:.0%} of {target:.0f}")
    return _build(cls, cfg, seed, model)


def _other_model(model: nn.Module, size_ratio: float, kind: str, seed: int, tolerance: float,
                 example_input: Any, note: Callable[[str], None] | None) -> nn.Module:
    """:func:`student_of` for a model without width rules: a narrowed copy."""
    from nncompress.models.narrowed import narrowed_student

    name = type(model).__name__
    if kind not in KINDS:
        raise ModelError(f"unknown student kind {kind!r}; known: {', '.join(KINDS)}")
    if kind not in ("auto", "width"):
        raise ModelError(f"student kind {kind!r} needs one of the reference models "
                         f"({', '.join(_RULES)}); a {name} gets a 'width' student")
    if example_input is None:
        raise ModelError(f"a width student of a {name} (not a reference model) is narrowed "
                         "along its structured-pruning graph: give example_input, a batch "
                         "the model accepts")
    return narrowed_student(model, size_ratio, example_input, seed=seed, tolerance=tolerance,
                            note=note)
