"""An accuracy budget a recipe keeps: back lossy stages off until the drop is within it.

With ``Recipe.max_drop`` (percentage points), ``compress`` carves a validation split from
the training data (:func:`nncompress.data.holdout`; the stages train on the rest and the
test split is never looked at) and runs the recipe in *segments*: a technique stage plus
the ``fine_tune`` / ``evaluate`` stages after it. After a segment whose technique has a
backoff rule in :data:`BACKOFF`, the validation accuracy must be within ``max_drop``
points of the uncompressed model's; otherwise the segment is rerun from the model (and
masks) it started from, with the technique's strength backed off one notch -- lower
sparsity, a higher sparse-VD threshold, more centroids, less hashing, fewer pruned
channels, higher rank -- until it holds or the rule runs out of room (then the mildest
setting tried is kept and the log says the budget was not met). Every attempt is logged.

Exact stages (``fold_batchnorm``, ``dead_units``) have no rule: they cannot lose accuracy.

The reference accuracy is not simply the uncompressed model's on the validation split:
that model was trained on those samples and remembers them (a LeNet-300-100 scores 99.5 %
on them against 97 % on the test split), while the stages retrain on the rest and forget
them, so every compressed model would look 2-4 points worse than it is. The reference is
the lower of that accuracy and the accuracy of a *control*: a copy of the uncompressed
model fine-tuned on the same training part for :data:`CONTROL_EPOCHS` epochs, without any
compression -- what retraining alone costs on the split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from torch import nn

if TYPE_CHECKING:
    from nncompress.data import Dataset

__all__ = ["BACKOFF", "CONTROL_EPOCHS", "Backoff", "backed_off", "reference_accuracy"]

#: epochs of the control run that measures what retraining alone costs on the split
CONTROL_EPOCHS = 10

Params = dict[str, Any]


@dataclass(frozen=True)
class Backoff:
    """How one technique is made milder: ``step(params) -> params`` (None when it cannot
    be milder), and ``describe(params)`` naming its strength for the log."""

    step: Callable[[Params], Params | None]
    describe: Callable[[Params], str]


def _scaled_sparsity(key: str) -> Backoff:
    """Keep 1.5x as many weights each notch (0.9 -> 0.85 -> 0.775 ...)."""
    def step(p: Params) -> Params | None:
        s = float(p[key])
        new = 1.0 - (1.0 - s) * 1.5
        return {**p, key: round(new, 6)} if new > 0.05 else None
    return Backoff(step, lambda p: f"{key} {float(p[key]):.4g}")


def _sparse_vd(p: Params) -> Params | None:
    """Half the KL weight: the data counts more, fewer weights are dropped and less noise
    is trained in. (The threshold barely matters: sparse VD's log alphas are bimodal --
    on LeNet-300-100 thresholds 0, 1 and 3 gave the same accuracy and size -- so the
    backoff turns the KL down instead.)"""
    new = float(p.get("kl_weight", 1.0)) / 2
    return {**p, "kl_weight": new} if new >= 1 / 64 else None


_BITS = ("bits", "conv_bits", "linear_bits", "rnn_bits", "embedding_bits")


def _sharing(p: Params) -> Params | None:
    """One more bit per shared layer (twice the centroids), and half the zero_below."""
    if p.get("bits") is not None:
        if p["bits"] >= 8:
            return None
        return {**p, "bits": p["bits"] + 1, "zero_below": p.get("zero_below", 0.0) / 2}
    keys = [k for k in _BITS[1:] if k in p and p[k] < 8]
    if not keys:
        return None
    return {**p, **{k: p[k] + 1 for k in keys}, "zero_below": p.get("zero_below", 0.0) / 2}


def _hashing(p: Params) -> Params | None:
    new = float(p["compression"]) / 1.5
    return {**p, "compression": new} if new >= 1.0 else None


def _structured(p: Params) -> Params | None:
    """Remove three quarters as much: ratio x 0.75, or MAC reduction 1 + (r - 1) x 0.75."""
    if p.get("macs_reduction") is not None:
        new = 1.0 + (float(p["macs_reduction"]) - 1.0) * 0.75
        return {**p, "macs_reduction": new} if new > 1.05 else None
    ratio = p.get("ratio")
    if isinstance(ratio, Mapping):
        new_map = {k: float(v) * 0.75 for k, v in ratio.items()}
        return {**p, "ratio": new_map} if max(new_map.values(), default=0.0) > 0.02 else None
    new = float(ratio) * 0.75
    return {**p, "ratio": new} if new > 0.02 else None


def _structured_name(p: Params) -> str:
    return (f"macs_reduction {float(p['macs_reduction']):.3g}"
            if p.get("macs_reduction") is not None else f"ratio {p.get('ratio')}")


def _low_rank(p: Params) -> Params | None:
    if p.get("energy") is not None:
        new = 1.0 - (1.0 - float(p["energy"])) / 2
        return {**p, "energy": new} if new < 0.9999 else None
    if p.get("rank_ratio") is not None:
        new = min(1.0, float(p["rank_ratio"]) * 1.5)
        return {**p, "rank_ratio": new} if float(p["rank_ratio"]) < 1.0 else None
    new = 1.0 + (float(p["params_reduction"]) - 1.0) * 0.75
    return {**p, "params_reduction": new} if new > 1.05 else None


def _layer_prune(p: Params) -> Params | None:
    if p.get("count") is not None:
        return {**p, "count": p["count"] - 1} if p["count"] > 1 else None
    key = "params_reduction" if p.get("params_reduction") is not None else "macs_reduction"
    new = 1.0 + (float(p[key]) - 1.0) * 0.75
    return {**p, key: new} if new > 1.05 else None


def _lowbit(p: Params) -> Params | None:
    """One more bit for the weights (and the inputs, when they are quantized)."""
    if int(p["weight_bits"]) >= 8:
        return None
    acts = p.get("activation_bits")
    return {**p, "weight_bits": int(p["weight_bits"]) + 1,
            "activation_bits": None if acts is None else min(8, int(acts) + 1)}


def _mixed(p: Params) -> Params | None:
    """A quarter more bytes for the weight codes (whichever budget was given)."""
    for key, top in (("average_bits", 8.0), ("budget_ratio", 1.0), ("budget_bytes", None)):
        if p.get(key) is not None:
            new = float(p[key]) * 1.25
            if top is not None and float(p[key]) >= top:
                return None
            return {**p, key: min(new, top) if top is not None else round(new)}
    return None


def _binarize(p: Params) -> Params | None:
    """Binary inputs -> float inputs (weights stay 1-bit); then nothing milder."""
    return {**p, "activations": False} if p.get("activations") else None


def _named(*keys: str) -> Callable[[Params], str]:
    return lambda p: ", ".join(f"{k} {p[k]}" for k in keys if p.get(k) is not None)


#: technique -> how it backs off. Techniques not listed are exact or not tunable.
BACKOFF: dict[str, Backoff] = {
    "magnitude_prune": _scaled_sparsity("sparsity"),
    "dynamic_surgery": _scaled_sparsity("sparsity"),
    "sparse_vd": Backoff(_sparse_vd, _named("kl_weight", "threshold")),
    "weight_sharing": Backoff(_sharing, _named(*_BITS, "zero_below")),
    "hashed_net": Backoff(_hashing, _named("compression")),
    "l1_filter_prune": Backoff(_structured, _structured_name),
    "network_slimming": Backoff(_structured, _structured_name),
    "channel_lasso": Backoff(_structured, _structured_name),
    "thinet": Backoff(_structured, _structured_name),
    "low_rank": Backoff(_low_rank, _named("energy", "rank_ratio", "params_reduction")),
    "layer_prune": Backoff(_layer_prune, _named("count", "params_reduction",
                                                "macs_reduction")),
    "lowbit": Backoff(_lowbit, _named("weight_bits", "activation_bits")),
    "mixed_precision": Backoff(_mixed, _named("average_bits", "budget_ratio", "budget_bytes")),
    "binarize": Backoff(_binarize, _named("activations")),
}


def backed_off(technique: str, config: BaseModel) -> BaseModel | None:
    """``config`` one notch milder (validated by its own class), or None if it cannot be."""
    rule = BACKOFF.get(technique)
    if rule is None:
        return None
    params = rule.step(config.model_dump())
    if params is None:
        return None
    try:
        return type(config).model_validate(params)
    except Exception:  # the milder setting is out of the config's range: no further notch
        return None


def reference_accuracy(model: nn.Module, train_part: Dataset, held_out: Any, *, lr: float,
                       seed: int, progress: bool) -> tuple[float, float]:
    """``(uncompressed, control)`` accuracy on ``held_out``: the model as given, and a copy
    fine-tuned :data:`CONTROL_EPOCHS` epochs on ``train_part`` at ``lr`` (see the module
    docstring); the budget's reference is the lower of the two."""
    from nncompress.measure import accuracy
    from nncompress.train import fine_tune

    control = copy.deepcopy(model)
    fine_tune(control, train_part, epochs=CONTROL_EPOCHS, lr=lr, seed=seed,
              progress=progress, desc="max_drop control")
    return accuracy(model, held_out), accuracy(control, held_out)


def strength(technique: str, config: BaseModel) -> str:
    """The setting the backoff changes, for the log."""
    rule = BACKOFF.get(technique)
    return rule.describe(config.model_dump()) if rule is not None else ""
