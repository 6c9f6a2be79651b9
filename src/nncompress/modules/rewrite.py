"""Rewrite PyTorch built-ins whose forward reads submodule weights directly.

:func:`decompose` replaces, in place and function-preserving (to float rounding):

- every ``nn.MultiheadAttention`` by a :class:`SplitMultiheadAttention` (its packed
  ``in_proj_weight`` split into called ``q_proj`` / ``k_proj`` / ``v_proj`` Linears;
  ``out_proj`` copied into a plain Linear);
- every ``nn.TransformerEncoderLayer`` by a :class:`SplitTransformerEncoderLayer` (same
  children, no fused fast path that reads ``linear1.weight`` behind the module's back);
- and turns off the nested-tensor fast path of every ``nn.TransformerEncoder`` holding
  rewritten layers.

A layer that cannot be rewritten exactly (``add_bias_kv``, ``add_zero_attn``, an
activation outside :data:`~nncompress.modules.attention.ACTIVATIONS`) raises
:class:`~nncompress.errors.UnsupportedLayerError` naming it, before anything is changed.
Pruning masks keyed by parameter name follow the split (``in_proj_weight``'s mask is cut
into the three projections' masks).
"""

from __future__ import annotations

import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.modules.attention import (
    SplitMultiheadAttention,
    SplitTransformerEncoderLayer,
    activation_name,
)

__all__ = ["decompose", "needs_decompose"]

Masks = dict[str, torch.Tensor]


def needs_decompose(model: nn.Module) -> bool:
    """Whether ``model`` holds a built-in that :func:`decompose` would rewrite."""
    return any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer))
               for m in model.modules())


def _check(model: nn.Module) -> None:
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
            bad.append(f"{name or '<model>'} (MultiheadAttention with add_bias_kv or "
                       "add_zero_attn)")
        if isinstance(m, nn.TransformerEncoderLayer) and activation_name(m.activation) is None:
            bad.append(f"{name or '<model>'} (TransformerEncoderLayer with activation "
                       f"{m.activation!r})")
    if bad:
        raise UnsupportedLayerError("cannot rewrite to an equivalent with called "
                                    f"projections: {', '.join(bad)}")


def _split_attention(m: nn.MultiheadAttention) -> SplitMultiheadAttention:
    ref = m.out_proj.weight
    new = SplitMultiheadAttention(m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim,
                                  bias=m.in_proj_bias is not None, dropout=m.dropout,
                                  batch_first=m.batch_first, device=ref.device,
                                  dtype=ref.dtype)
    if m._qkv_same_embed_dim:
        weights = m.in_proj_weight.detach().chunk(3)
    else:
        weights = (m.q_proj_weight.detach(), m.k_proj_weight.detach(),
                   m.v_proj_weight.detach())
    biases = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None,) * 3
    with torch.no_grad():
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases,
                              strict=True):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)
    with torch.no_grad():  # a plain Linear (the built-in's is a private subclass)
        new.out_proj.weight.copy_(m.out_proj.weight)
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
    new.train(m.training)
    return new


def _split_masks(path: str, m: nn.MultiheadAttention, masks: Masks) -> None:
    prefix = f"{path}." if path else ""
    packed = masks.pop(f"{prefix}in_proj_weight", None)
    parts = packed.chunk(3) if packed is not None else (None,) * 3
    for proj, own, part in zip(("q_proj", "k_proj", "v_proj"),
                               ("q_proj_weight", "k_proj_weight", "v_proj_weight"), parts,
                               strict=True):
        mask = masks.pop(f"{prefix}{own}", part)
        if mask is not None:
            masks[f"{prefix}{proj}.weight"] = mask.clone()


def _split_layer(m: nn.TransformerEncoderLayer) -> SplitTransformerEncoderLayer:
    # built on the meta device: every tensor-holding child is replaced by the built-in's
    new = SplitTransformerEncoderLayer(
        m.linear1.in_features, m.self_attn.num_heads, m.linear1.out_features,
        dropout_p=m.dropout.p, activation_name=activation_name(m.activation) or "relu",
        layer_norm_eps=m.norm1.eps, batch_first=m.self_attn.batch_first,
        norm_first=m.norm_first, bias=m.linear1.bias is not None, device="meta")
    for child in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2",
                  "dropout1", "dropout2"):
        setattr(new, child, getattr(m, child))
    if isinstance(m.activation, nn.Module):
        new.activation = m.activation
    new.train(m.training)
    return new


def decompose(model: nn.Module, masks: Masks | None = None) -> tuple[nn.Module, list[str]]:
    """Rewrite the built-ins of ``model`` in place (see the module docstring); returns the
    model (a new object only when the model itself is a rewritten built-in) and one note
    per rewritten layer. ``masks`` (``Context.masks``) are renamed along."""
    _check(model)
    notes: list[str] = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            if masks is not None:
                _split_masks(name, m, masks)
            model = _replace(model, name, _split_attention(m))
            notes.append(f"{name or '<model>'}: nn.MultiheadAttention -> "
                         "SplitMultiheadAttention (packed in_proj_weight split into called "
                         "q/k/v Linears)")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.TransformerEncoderLayer):
            model = _replace(model, name, _split_layer(m))
            notes.append(f"{name or '<model>'}: nn.TransformerEncoderLayer -> "
                         "SplitTransformerEncoderLayer (its fused fast path reads "
                         "linear1.weight / in_proj_weight directly)")
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(layer, SplitTransformerEncoderLayer) for layer in m.layers):
            m.use_nested_tensor = False
    return model, notes


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    model.set_submodule(name, new)
    return model
