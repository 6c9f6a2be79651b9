"""Accuracy against bytes for mixed precision and uniform widths (the Pareto comparison).

Mixed precision after Dong, Yao, Gholami, Mahoney & Keutzer (2019), "HAWQ: Hessian AWare
Quantization of neural networks with mixed-precision" (:mod:`nncompress.quant.mixed`);
uniform widths are the ``lowbit`` technique with every quantized layer at one width
(Hubara et al. 2017, "Quantized neural networks"). Each point starts from a copy of the
same model and gets the same fine-tuning; bytes are measured on the ``.nnc`` file
(:func:`nncompress.measure.artifact_bytes`) and on the stored weight codes, accuracy on
the test split. :func:`nncompress.report.pareto.plot_pareto` draws the points.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from nncompress import inputs
from nncompress.data import Dataset
from nncompress.quant.lowbit import lowbit
from nncompress.quant.lowbit_layers import FROZEN_OF
from nncompress.quant.mixed import (
    MixedPrecisionConfig,
    lowbit_config,
    mixed_precision,
    probe_copy,
    stored_code_bytes,
    training_batches,
    uniform_bits,
)
from nncompress.technique import Context

__all__ = ["Point", "pareto", "uniform_bytes"]


@dataclass(frozen=True)
class Point:
    """One configuration measured by :func:`pareto`: ``kind`` "mixed", "uniform" or
    "pinned" (uniform but for the layers ``keep_first`` / ``keep_last`` pin at 8 bits),
    ``label``, ``bytes`` of the whole ``.nnc`` file, ``code_bytes`` of the quantized
    layers' weight codes as stored, top-1 test ``accuracy`` in [0, 1], the widths
    ``bits`` ((layer, bits) in module order) and the ``budget`` (mixed only; bytes of
    weight codes)."""

    kind: str
    label: str
    bytes: int
    code_bytes: int
    accuracy: float
    bits: tuple[tuple[str, int], ...]
    budget: int | None = None


def _measured(kind: str, label: str, model: nn.Module, data: Dataset,
              budget: int | None) -> Point:
    from nncompress.measure import artifact_bytes
    from nncompress.train import evaluate

    frozen = tuple(FROZEN_OF.values())
    bits = {n: int(getattr(m, "weight_bits", 0)) for n, m in model.named_modules()
            if isinstance(m, frozen)}
    return Point(kind, label, artifact_bytes(model), stored_code_bytes(model, list(bits)),
                 evaluate(model, data.test), tuple(bits.items()), budget)


def _default(config: MixedPrecisionConfig | None) -> MixedPrecisionConfig:
    return config if config is not None else MixedPrecisionConfig(budget_ratio=1.0)


def uniform_bytes(model: nn.Module, data: Dataset, bits: int,
                  config: MixedPrecisionConfig | None = None) -> int:
    """Predicted bytes of the weight codes (``config``'s cost model) with every quantized
    layer at ``bits`` (pinned layers at 8): the budget at which mixed precision matches
    uniform ``bits``."""
    probe = probe_copy(model, Context(data, progress=False))
    x = inputs.concat([x for x, _ in training_batches(data, 1, 0)])
    return uniform_bits(probe, _default(config), x, bits)[1]


def _with_budget(config: MixedPrecisionConfig, budget: int, seed: int) -> MixedPrecisionConfig:
    update: Mapping[str, object] = {"budget_bytes": int(budget), "budget_ratio": None,
                                    "average_bits": None, "seed": seed}
    return MixedPrecisionConfig.model_validate(config.model_dump() | dict(update))


def _uniform_kind(config: MixedPrecisionConfig, bits: int) -> tuple[str, str]:
    """("uniform", "uniform 3-bit"), or with pinned layers ("pinned", "uniform 3-bit,
    first/last 8-bit")."""
    pins = [w for w, on in (("first", config.keep_first), ("last", config.keep_last)) if on]
    if not pins:
        return "uniform", f"uniform {bits}-bit"
    return "pinned", f"uniform {bits}-bit, {'/'.join(pins)} 8-bit"


def pareto(model: nn.Module, data: Dataset, budgets: Sequence[int], *,
           uniform: Sequence[int] = (), config: MixedPrecisionConfig | None = None,
           seed: int = 0, progress: bool = False) -> list[Point]:
    """Accuracy against bytes: ``lowbit`` with every quantized layer at each ``uniform``
    width (pinned layers at 8: kind "pinned"), then ``mixed_precision`` at each budget
    (bytes of weight codes), each from a copy of ``model`` with ``config``'s sensitivity
    and fine-tuning options (default: :class:`MixedPrecisionConfig`'s) and ``seed``."""
    config = _default(config)
    points = []
    for b in uniform:
        ctx = Context(data, seed=seed, progress=progress)
        probe = probe_copy(model, ctx)
        x = inputs.concat([x for x, _ in training_batches(data, 1, seed)])
        bits, _ = uniform_bits(probe, config, x, b)
        out = lowbit(probe, lowbit_config(config, bits, seed), ctx)
        points.append(_measured(*_uniform_kind(config, b), out, data, None))
    for budget in budgets:
        ctx = Context(data, seed=seed, progress=progress)
        out = mixed_precision(copy.deepcopy(model), _with_budget(config, budget, seed), ctx)
        points.append(_measured("mixed", f"mixed <= {budget} B", out, data, int(budget)))
    return points
