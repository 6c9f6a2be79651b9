"""Multiply-accumulate (MAC) counts per sample, measured by running the model once.

What is counted: the multiply-accumulates of weight layers (Linear, convolutions,
recurrent layers) and the two activation-by-activation matmuls of attention (``Q K^T``
and ``A V``). Bias additions, normalisation, activations, pooling, residual additions,
softmax, elementwise gate products and embedding look-ups count 0. ``sparse_macs`` counts
only the MACs whose weight is non-zero (a layer's MACs times its weight density): what a
perfect sparse kernel would execute. Attention matmuls have no weights, so they are dense.

How: a forward hook on every module with a rule in :data:`MAC_RULES` sees the real input
and output shapes of one call of ``model(example_input)``; totals are divided by the
batch size (``example_input.shape[0]``). A leaf module with parameters and no rule raises
:class:`UnsupportedLayerError`: nothing is skipped silently. Parameters held directly by
a non-leaf module (e.g. a positional embedding that is added) are not MACs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from nncompress import inputs
from nncompress.errors import UnsupportedLayerError
from nncompress.inputs import Inputs
from nncompress.measure._common import call_model, count_nonzero, eval_mode

__all__ = ["MAC_RULES", "LayerMacs", "MacCount", "MacRule", "count_macs"]


@dataclass(frozen=True)
class LayerMacs:
    """MACs of one layer per sample. ``params`` / ``nonzero_params`` are element counts of
    the parameters this entry covers (weights and biases; 0 for a self-attention entry,
    whose projections are their own Linear entries)."""

    name: str
    type: str
    macs: int
    params: int
    nonzero_params: int
    sparse_macs: int


@dataclass(frozen=True)
class MacCount:
    """Per-sample MACs of a model: ``total`` and one entry per counted layer, in the order
    their first calls finished (a container such as attention after its projections)."""

    total: int
    layers: tuple[LayerMacs, ...]

    @property
    def sparse_total(self) -> int:
        """Per-sample MACs counting only non-zero weights (sum of ``sparse_macs``)."""
        return sum(layer.sparse_macs for layer in self.layers)


@dataclass(frozen=True)
class Term:
    """MACs of one whole call (all samples): dense, and with zero weights skipped."""

    macs: int
    sparse: int

    def __add__(self, other: Term) -> Term:
        return Term(self.macs + other.macs, self.sparse + other.sparse)


MacFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Term]


@dataclass(frozen=True)
class MacRule:
    """How one module type is counted.

    ``count(module, args, kwargs, output)`` gives the MACs of one call, or ``count`` is
    None for a known layer with 0 MACs (norms, embeddings), which is not listed.
    ``recurse``: the entry's ``params`` include its submodules' parameters (for
    ``nn.MultiheadAttention``, whose ``out_proj`` is used without being called).
    """

    count: MacFn | None
    recurse: bool = False


def _weighted(rows: int, weight: torch.Tensor) -> Term:
    """``rows`` vectors each multiplied by ``weight`` (every weight element used once)."""
    return Term(rows * weight.numel(), rows * count_nonzero(weight))


def _dense(macs: int) -> Term:
    return Term(macs, macs)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _linear(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Term:
    """``[..., in] -> [..., out]``: each leading position uses the whole weight once."""
    return _weighted(out.numel() // m.out_features, m.weight)


def _conv(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Term:
    """Each output position (batch x spatial) uses every weight of ``[out, in/groups, *k]``
    once: out elements x in/groups x kernel size MACs in all."""
    return _weighted(out.numel() // m.out_channels, m.weight)


def _csr_weight(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                out: Any) -> Term:
    """A CSR layer of ``nncompress.kernels`` (SparseLinear, SparseConv: a ``[rows, cols]``
    matrix, ``rows`` the output features / channels): each output position uses the whole
    matrix once; its stored non-zeros are the non-zero MACs."""
    rows, cols = m.matrix_shape
    positions = out.numel() // rows
    return Term(positions * rows * cols, positions * count_nonzero(m.values))


def _conv_transpose(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    out: Any) -> Term:
    """Each input position (batch x spatial) scatters through every weight once."""
    x = _arg(args, kwargs, 0, "input")
    return _weighted(x.numel() // m.in_channels, m.weight)


def _rnn_weights(m: nn.Module) -> list[torch.Tensor]:
    """Weight matrices of every layer and direction (``weight_ih``, ``weight_hh``,
    ``weight_hr`` for LSTM projections); each is used once per time step."""
    return [getattr(m, n) for n in m._flat_weights_names if n.startswith("weight")]


def _rnn(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Term:
    """GRU / LSTM / RNN: per time step and layer/direction, gates x (input x hidden + hidden
    x hidden) (+ hidden x proj for LSTM ``proj_size``) = the weight matrices' sizes; times
    the number of (sample, step) pairs, read from the input whatever its layout."""
    x = _arg(args, kwargs, 0, "input")
    if isinstance(x, PackedSequence):
        steps = x.data.shape[0]
    else:
        steps = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    terms = [_weighted(steps, w) for w in _rnn_weights(m)]
    return sum(terms[1:], terms[0])


def _rnn_cell(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Term:
    """One step of GRUCell / LSTMCell / RNNCell per sample."""
    x = _arg(args, kwargs, 0, "input")
    rows = x.numel() // m.input_size
    return _weighted(rows, m.weight_ih) + _weighted(rows, m.weight_hh)


def _program(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Term:
    """An integer program (``nncompress.quant.Int8Model``): its own count, per sample."""
    dense, sparse = m.macs(*args)
    batch = args[0].shape[0]
    return Term(dense * batch, sparse * batch)


def _self_attention(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    out: Any) -> Term:
    """Hand-written self-attention on ``[B, T, dim]``: ``Q K^T`` and ``A V`` are each
    heads x T x T x head_dim MACs per sample. Its q/k/v/out Linears count themselves."""
    x = _arg(args, kwargs, 0, "x")
    tokens = x.shape[-2]
    samples = x.numel() // (x.shape[-1] * tokens)
    return _dense(2 * samples * int(m.num_heads) * tokens * tokens * int(m.head_dim))


def _split_attention(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     out: Any) -> Term:
    """``SplitMultiheadAttention`` (nncompress.modules): ``Q K^T`` and ``A V``, target x
    source x heads x head_dim each; its q/k/v/out Linears count themselves."""
    query = _arg(args, kwargs, 0, "query")
    key = _arg(args, kwargs, 1, "key")
    seq_dim = 1 if (m.batch_first and query.dim() == 3) else 0
    inner = int(m.num_heads) * int(m.head_dim)
    q_rows = query.numel() // query.shape[-1]
    return _dense(2 * q_rows * key.shape[seq_dim] * inner)


def _multihead_attention(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                         out: Any) -> Term:
    """``nn.MultiheadAttention``: q/k/v input projections, ``Q K^T`` and ``A V``
    (target x source x embed_dim each), and ``out_proj`` (called functionally, so its own
    hook never fires)."""
    query = _arg(args, kwargs, 0, "query")
    key = _arg(args, kwargs, 1, "key")
    e = m.embed_dim
    seq_dim = 1 if (m.batch_first and query.dim() == 3) else 0
    source = key.shape[seq_dim] + int(m.bias_k is not None) + int(m.add_zero_attn)
    q_rows, kv_rows = query.numel() // e, key.numel() // m.kdim
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.split(e)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    return (_weighted(q_rows, w_q) + _weighted(kv_rows, w_k) + _weighted(kv_rows, w_v)
            + _dense(2 * q_rows * source * e) + _weighted(q_rows, m.out_proj.weight))


_ZERO = MacRule(None)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)

#: The one table from module type to how its MACs are counted. Keys are classes, matched
#: along the module's MRO (so subclasses inherit a rule), or a class *name* string for
#: classes defined in packages this module must not import: ``"MultiHeadSelfAttention"``
#: is the reference transformer's attention (``nncompress.models.transformer``) and
#: ``"SplitMultiheadAttention"`` the rewritten ``nn.MultiheadAttention``
#: (``nncompress.modules``); any class of those names needs ``num_heads`` and ``head_dim``
#: attributes.
MAC_RULES: Mapping[type[nn.Module] | str, MacRule] = MappingProxyType({
    nn.Linear: MacRule(_linear),
    nn.Conv1d: MacRule(_conv), nn.Conv2d: MacRule(_conv), nn.Conv3d: MacRule(_conv),
    nn.ConvTranspose1d: MacRule(_conv_transpose), nn.ConvTranspose2d: MacRule(_conv_transpose),
    nn.ConvTranspose3d: MacRule(_conv_transpose),
    nn.RNNBase: MacRule(_rnn),  # nn.RNN, nn.GRU, nn.LSTM
    nn.RNNCellBase: MacRule(_rnn_cell),  # nn.RNNCell, nn.GRUCell, nn.LSTMCell
    "MultiHeadSelfAttention": MacRule(_self_attention),
    "SplitMultiheadAttention": MacRule(_split_attention),
    "Int8Model": MacRule(_program, recurse=True),
    "CSRWeight": MacRule(_csr_weight),  # nncompress.kernels' SparseLinear / SparseConv
    nn.MultiheadAttention: MacRule(_multihead_attention, recurse=True),
    **{norm: _ZERO for norm in _NORMS},
    nn.Embedding: _ZERO, nn.EmbeddingBag: _ZERO, nn.PReLU: _ZERO,
})


def rule_for(module: nn.Module) -> MacRule | None:
    """The rule of the nearest class in ``type(module)``'s MRO, by class or by name."""
    for cls in type(module).__mro__:
        if cls in MAC_RULES:
            return MAC_RULES[cls]
        if cls.__name__ in MAC_RULES:
            return MAC_RULES[cls.__name__]
    return None


def _display(name: str) -> str:
    return name or "<model>"


def _counted_modules(model: nn.Module) -> dict[str, tuple[nn.Module, MacRule]]:
    """Modules that count MACs, by qualified name; raises for an unknown weighted leaf."""
    counted: dict[str, tuple[nn.Module, MacRule]] = {}
    for name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            is_leaf = next(module.children(), None) is None
            if is_leaf and next(module.parameters(recurse=False), None) is not None:
                raise UnsupportedLayerError(
                    f"cannot count MACs of layer {_display(name)!r}: its type "
                    f"{type(module).__qualname__} has parameters but no rule in "
                    "nncompress.measure.macs.MAC_RULES")
        elif rule.count is not None:
            counted[name] = (module, rule)
    return counted


def _record(totals: dict[str, Term], name: str, rule: MacRule, module: nn.Module,
            args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """Forward hook body: add this call's MACs to ``totals[name]`` (a module may be called
    several times per forward)."""
    assert rule.count is not None
    term = rule.count(module, args, kwargs, output)
    totals[name] = totals[name] + term if name in totals else term


def _per_sample(total: int, batch: int) -> int:
    return (total + batch // 2) // batch


def _layer(name: str, module: nn.Module, rule: MacRule, term: Term, batch: int) -> LayerMacs:
    params = list(module.parameters(recurse=rule.recurse))
    return LayerMacs(
        name=_display(name), type=type(module).__name__,
        macs=_per_sample(term.macs, batch),
        params=sum(p.numel() for p in params),
        nonzero_params=sum(count_nonzero(p) for p in params),
        sparse_macs=_per_sample(term.sparse, batch),
    )


def count_macs(model: nn.Module, example_input: Inputs) -> MacCount:
    """Per-sample MACs of ``model`` on ``example_input`` ``[B, *input_shape]`` (or a tuple /
    dict of such tensors, see :mod:`nncompress.inputs`).

    Runs one forward pass in eval mode without autograd (the train/eval flags are
    restored afterwards); every call of a counted module is summed, and totals are
    divided by ``B``. Raises :class:`UnsupportedLayerError` naming the first leaf layer
    with parameters whose type has no rule in :data:`MAC_RULES`.
    """
    inputs.check(example_input, "example_input")
    batch = inputs.batch_size(example_input)
    if batch < 1:
        raise ValueError("example_input must hold at least one sample")
    counted = _counted_modules(model)
    totals: dict[str, Term] = {}
    handles = [module.register_forward_hook(partial(_record, totals, name, rule),
                                            with_kwargs=True)
               for name, (module, rule) in counted.items()]
    try:
        with eval_mode(model), torch.inference_mode():
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    layers = tuple(_layer(name, *counted[name], term, batch) for name, term in totals.items())
    return MacCount(total=sum(layer.macs for layer in layers), layers=layers)
