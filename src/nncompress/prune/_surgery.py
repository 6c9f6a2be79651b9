"""The surgery rules of structured pruning: one table per role, keyed by layer type.

Each rule ``rule(module, keep)`` keeps, in place, the indices ``keep`` (ascending int64)
of the module's dimension that the role names (see :class:`~nncompress.graph.ChannelGroup`):

- ``"out"``: output channels of a Linear / convolution (whole groups of a grouped one,
  channel = group of a depthwise one), embedding dimensions of an Embedding, hidden units
  of an RNN -- the same units in every layer and direction, with the next layer's input
  columns (projection units for an LSTM with ``proj_size``);
- ``"in"``: input columns of a Linear / convolution / first RNN layer (a grouped
  convolution's inputs follow its outputs, so its rule only checks);
- ``"norm"``: per-channel entries of BatchNorm / LayerNorm / GroupNorm / InstanceNorm /
  RMSNorm (GroupNorm keeps whole groups);
- ``"cell"``: cell units of an LSTM with projections (gate rows, ``weight_hr`` columns).

Score functions give, per index of the same dimension, the L1 mass of the weights that
index owns (rows for ``"out"``, columns for ``"in"``, |gamma| for norms), for the
importance criteria in ``structured.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError

__all__ = ["RULES", "SCORES", "apply_rule", "score_of"]

Rule = Callable[[nn.Module, torch.Tensor], None]
CONV = (nn.Conv1d, nn.Conv2d)
RNN = (nn.GRU, nn.LSTM, nn.RNN)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def _take(module: nn.Module, names: tuple[str, ...], keep: torch.Tensor, dim: int = 0) -> None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            _set(module, name, value.data.index_select(dim, keep.to(value.device)))


def _blocks(keep: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """The whole blocks of size ``block`` that ``keep`` consists of."""
    groups = torch.unique(keep // block)
    whole = (groups[:, None] * block + torch.arange(block)[None, :]).flatten()
    if whole.numel() != keep.numel() or not torch.equal(whole, keep):
        raise UnsupportedLayerError(f"{what}: channels must be kept in whole groups of "
                                    f"{block}")
    return groups


def _conv_out(m: nn.Module, keep: torch.Tensor) -> None:
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups > 1 and not depthwise:
        block_in, block_out = m.in_channels // m.groups, m.out_channels // m.groups
        groups = _blocks(keep, block_out, f"grouped {type(m).__name__}")
        m.groups = len(groups)
        m.in_channels = m.groups * block_in
    _take(m, ("weight", "bias"), keep)
    m.out_channels = len(keep)
    if depthwise:
        m.in_channels = m.groups = len(keep)


def _conv_in(m: nn.Module, keep: torch.Tensor) -> None:
    if m.groups > 1:  # a grouped convolution loses inputs with its output groups
        _blocks(keep, m.in_channels // m.groups if m.groups > 1 else 1, type(m).__name__)
        return
    _take(m, ("weight",), keep, dim=1)
    m.in_channels = len(keep)


def _linear_out(m: nn.Linear, keep: torch.Tensor) -> None:
    _take(m, ("weight", "bias"), keep)
    m.out_features = len(keep)


def _linear_in(m: nn.Linear, keep: torch.Tensor) -> None:
    _take(m, ("weight",), keep, dim=1)
    m.in_features = len(keep)


def _embedding_out(m: nn.Embedding, keep: torch.Tensor) -> None:
    _take(m, ("weight",), keep, dim=1)
    m.embedding_dim = len(keep)


def _suffixes(m: nn.RNNBase) -> list[str]:
    dirs = ("", "_reverse") if m.bidirectional else ("",)
    return [f"_l{layer}{d}" for layer in range(m.num_layers) for d in dirs]


def _gate_rows(m: nn.RNNBase, keep: torch.Tensor) -> torch.Tensor:
    """Rows of every gate of the kept units (computed before any weight changes)."""
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    return torch.cat([keep + g * m.hidden_size for g in range(gates)])


def _layer_inputs(m: nn.RNNBase, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Input columns of a layer above the first: every direction's kept units."""
    dirs = 2 if m.bidirectional else 1
    return torch.cat([keep + d * width for d in range(dirs)])


def _rnn_out(m: nn.RNNBase, keep: torch.Tensor) -> None:
    """Keep output units ``keep`` (hidden units, or projection units with proj_size) in
    every layer and direction, and the matching input columns of layers above the first."""
    proj = getattr(m, "proj_size", 0)
    width = proj or m.hidden_size
    rows = _gate_rows(m, keep)
    for sfx in _suffixes(m):
        if proj:
            _take(m, (f"weight_hr{sfx}",), keep)
            _take(m, (f"weight_hh{sfx}",), keep, dim=1)
        else:
            _take(m, (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}"),
                  rows)
            _take(m, (f"weight_hh{sfx}",), keep, dim=1)
        if not sfx.startswith("_l0"):
            _take(m, (f"weight_ih{sfx}",), _layer_inputs(m, keep, width), dim=1)
    if proj:
        m.proj_size = len(keep)
    else:
        m.hidden_size = len(keep)
    m._init_flat_weights()


def _lstm_cell(m: nn.LSTM, keep: torch.Tensor) -> None:
    """Keep cell units ``keep`` of an LSTM with projections in every layer and direction."""
    rows = _gate_rows(m, keep)
    for sfx in _suffixes(m):
        _take(m, (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}"),
              rows)
        _take(m, (f"weight_hr{sfx}",), keep, dim=1)
    m.hidden_size = len(keep)
    m._init_flat_weights()


def _rnn_in(m: nn.RNNBase, keep: torch.Tensor) -> None:
    sfx = ("_l0", "_l0_reverse") if m.bidirectional else ("_l0",)
    _take(m, tuple(f"weight_ih{s}" for s in sfx), keep, dim=1)
    m.input_size = len(keep)
    m._init_flat_weights()


def _batchnorm(m: nn.Module, keep: torch.Tensor) -> None:
    _take(m, ("weight", "bias", "running_mean", "running_var"), keep)
    m.num_features = len(keep)


def _layernorm(m: nn.Module, keep: torch.Tensor) -> None:
    _take(m, ("weight", "bias"), keep)
    m.normalized_shape = (len(keep),)


def _groupnorm(m: nn.GroupNorm, keep: torch.Tensor) -> None:
    groups = _blocks(keep, m.num_channels // m.num_groups, "GroupNorm")
    _take(m, ("weight", "bias"), keep)
    m.num_channels, m.num_groups = len(keep), len(groups)


#: (role, layer type) -> rule; matched along the module's MRO
RULES: dict[tuple[str, type[nn.Module]], Rule] = {
    ("out", nn.Linear): _linear_out, ("in", nn.Linear): _linear_in,
    **{("out", t): _conv_out for t in CONV}, **{("in", t): _conv_in for t in CONV},
    ("out", nn.Embedding): _embedding_out,
    **{("out", t): _rnn_out for t in RNN}, **{("in", t): _rnn_in for t in RNN},
    ("cell", nn.LSTM): _lstm_cell,
    **{("norm", t): _batchnorm for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                         nn.InstanceNorm1d, nn.InstanceNorm2d)},
    ("norm", nn.LayerNorm): _layernorm, ("norm", nn.RMSNorm): _layernorm,
    ("norm", nn.GroupNorm): _groupnorm,
}


def _lookup(table: dict, role: str, module: nn.Module):
    for cls in type(module).__mro__:
        if (role, cls) in table:
            return table[(role, cls)]
    return None


def apply_rule(name: str, role: str, module: nn.Module, keep: torch.Tensor) -> None:
    """Run the rule of ``(role, type(module))``; UnsupportedLayerError if there is none."""
    rule = _lookup(RULES, role, module)
    if rule is None:
        raise UnsupportedLayerError(f"no structured-pruning rule for {name} "
                                    f"({type(module).__name__}) as {role}")
    rule(module, keep)


# ------------------------------------------------------------------ L1 scores per index


def _abs(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float().cpu()


def _rows(w: torch.Tensor) -> torch.Tensor:
    return _abs(w).reshape(w.shape[0], -1).sum(dim=1)


def _rnn_out_score(m: nn.RNNBase) -> torch.Tensor:
    proj = getattr(m, "proj_size", 0)
    total = torch.zeros(proj or m.hidden_size)
    for sfx in _suffixes(m):
        if proj:
            total += _rows(getattr(m, f"weight_hr{sfx}"))
            continue
        for kind in ("ih", "hh"):
            w = getattr(m, f"weight_{kind}{sfx}")
            total += _abs(w).reshape(-1, m.hidden_size, w.shape[1]).sum(dim=(0, 2))
    return total


def _lstm_cell_score(m: nn.LSTM) -> torch.Tensor:
    total = torch.zeros(m.hidden_size)
    for sfx in _suffixes(m):
        for kind in ("ih", "hh"):
            w = getattr(m, f"weight_{kind}{sfx}")
            total += _abs(w).reshape(-1, m.hidden_size, w.shape[1]).sum(dim=(0, 2))
    return total


def _conv_in_score(m: nn.Module) -> torch.Tensor:
    w = _abs(m.weight)  # [out, in / groups, *k]
    g = m.groups
    per = w.reshape(g, m.out_channels // g, w.shape[1], -1).sum(dim=(1, 3))  # [g, in/g]
    return per.reshape(-1)


def _rnn_in_score(m: nn.RNNBase) -> torch.Tensor:
    names = ("weight_ih_l0", "weight_ih_l0_reverse") if m.bidirectional else ("weight_ih_l0",)
    return sum(_abs(getattr(m, n)).sum(dim=0) for n in names)


def _norm_score(m: nn.Module) -> torch.Tensor:
    weight = getattr(m, "weight", None)
    size = (m.num_features if hasattr(m, "num_features") else
            m.num_channels if isinstance(m, nn.GroupNorm) else m.normalized_shape[0])
    return _abs(weight) if weight is not None else torch.ones(size)


#: (role, layer type) -> L1 mass per index of the role's dimension
SCORES: dict[tuple[str, type[nn.Module]], Callable[[nn.Module], torch.Tensor]] = {
    ("out", nn.Linear): lambda m: _rows(m.weight),
    **{("out", t): (lambda m: _rows(m.weight)) for t in CONV},
    ("out", nn.Embedding): lambda m: _abs(m.weight).sum(dim=0),
    **{("out", t): _rnn_out_score for t in RNN},
    ("cell", nn.LSTM): _lstm_cell_score,
    ("in", nn.Linear): lambda m: _abs(m.weight).sum(dim=0),
    **{("in", t): _conv_in_score for t in CONV},
    **{("in", t): _rnn_in_score for t in RNN},
    **{("norm", t): _norm_score for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm,
                                          nn.RMSNorm, nn.GroupNorm)},
}


def score_of(role: str, module: nn.Module) -> torch.Tensor:
    """L1 mass per index of ``module`` in ``role`` (see :data:`SCORES`)."""
    fn = _lookup(SCORES, role, module)
    if fn is None:
        raise UnsupportedLayerError(f"no structured-pruning score for "
                                    f"{type(module).__name__} as {role}")
    return fn(module)
