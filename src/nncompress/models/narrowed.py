"""Width-scaled students of models nncompress did not write.

:func:`~nncompress.models.students.student_of` knows the width rules of its own
architectures. Any other model -- a user's ``nn.Sequential``, an
``nn.TransformerEncoder``, a stacked bidirectional GRU, a grouped CNN -- gets its width
student from the structured-pruning graph instead: every channel group that
:func:`~nncompress.prune.structured.prunable_groups` can remove units from (Linear / Conv
outputs, RNN hidden units, attention heads, FFN widths, the residual stream, with the
norms and consumers each group reaches) keeps the same fraction of its units, and the
result is re-initialised. The fraction is found by bisection on the parameter count, as
for the reference models. PyTorch built-ins that read their own weights
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) are first rewritten with
:func:`~nncompress.modules.decompose`, so the student holds the rewritten equivalents.

The student is the same kind of object as the teacher (pruned in place on a copy), so it
saves with ``nc.save`` and loads with ``nc.load(path, skeleton=Teacher())`` like any
pruned user model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from nncompress import inputs
from nncompress.errors import ModelError

__all__ = ["narrowed_student"]

_STEPS = 30


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _reinitialise(model: nn.Module, seed: int) -> list[str]:
    """Re-draw every parameter from its module's own initialiser (``reset_parameters``),
    seeded (torch's global RNG: the caller forks it). Returns the names of modules holding
    parameters of their own but no initialiser: those keep the teacher's (sliced) values."""
    kept = []
    torch.manual_seed(seed)
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        elif own:
            kept.append(name or type(m).__name__)
    return kept


def narrowed_student(model: nn.Module, size_ratio: float, example_input: inputs.Inputs, *,
                     seed: int = 0, tolerance: float = 0.15,
                     note: Callable[[str], None] | None = None) -> nn.Module:
    """A freshly initialised copy of ``model`` with every prunable channel group narrowed
    to the same fraction of its units, ~``1 / size_ratio`` of the parameters (within
    ``tolerance``, else a one-line ModelError, as is a model with no prunable group).
    ``example_input`` (a batch the model accepts) traces the groups. ``note`` receives
    what the analysis leaves alone and modules that keep their teacher values. Torch's
    global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _narrowed(model, size_ratio, example_input, seed, tolerance, note)


def _narrowed(model: nn.Module, size_ratio: float, example_input: inputs.Inputs, seed: int,
              tolerance: float, note: Callable[[str], None] | None) -> nn.Module:
    from nncompress.modules import decompose
    from nncompress.prune.structured import prunable_groups, prune_channels

    name = type(model).__name__
    base = copy.deepcopy(model).eval()
    base, _ = decompose(base)
    groups = prunable_groups(base, example_input, note)
    if not groups:
        raise ModelError(f"cannot build a width student of a {name}: structured pruning "
                         "finds no channel group it can narrow in it")
    teacher = _params(model)
    target = teacher / size_ratio

    def make(fraction: float) -> nn.Module:
        narrow = copy.deepcopy(base)
        keep = {g.name: range(max(1, round(fraction * g.size))) for g in groups}
        return prune_channels(narrow, keep, example_input, groups=groups)

    lo, hi = 0.0, 1.0
    smallest = _params(make(lo))
    if smallest > target * (1 + tolerance):
        raise ModelError(f"size_ratio {size_ratio:g} of a {teacher}-parameter {name}: its "
                         f"narrowest width student (one unit per group) has {smallest} "
                         f"parameters, more than {target:.0f}")
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        if _params(make(mid)) <= target:
            lo = mid
        else:
            hi = mid
    below, above = make(lo), make(hi)
    student = below if target - _params(below) <= _params(above) - target else above
    got = _params(student)
    if abs(got - target) > tolerance * target:
        raise ModelError(f"size_ratio {size_ratio:g} of a {teacher}-parameter {name}: the "
                         f"nearest width student has {got} parameters, not within "
                         f"{tolerance:.0%} of {target:.0f}")
    kept = _reinitialise(student, seed)
    if kept and note is not None:
        note(f"width student of {name}: {', '.join(kept)} hold parameters without a "
             "reset_parameters(); they keep the teacher's values, narrowed")
    return student.train(model.training)
