"""Any ``nn.Module`` to float ONNX through PyTorch's TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``), batch dimension dynamic, opset 17.

Why not the default dynamo exporter: it needs ``onnxscript``, which is not among
nncompress's pinned dependencies (nor installed here), so it would not run offline on a
user's machine as installed. The TorchScript path exports our GRU / LSTM layers as single
ONNX ``GRU`` / ``LSTM`` ops with a dynamic sequence length and is the one PyTorch's own
tests have long covered for recurrent models, where dynamo's exporter is slower and still
changing.

Layers registered in :data:`nncompress.export.LAYER_FORMS` are swapped for their
traceable stand-ins on a copy first (here: ``nn.LSTM`` with ``proj_size``, which ONNX's
``LSTM`` op cannot express, unrolled over the example's time steps; the quantized layers
in :mod:`~nncompress.export.onnx_quant_layers`). PyTorch's fused attention fast path is
switched off while tracing, so ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
export as plain ops. When PyTorch cannot export the model, every layer is exported alone
on the inputs it received in a forward pass -- leaves in call order, then containers
innermost first -- and the first that fails is named
(:class:`~nncompress.errors.UnsupportedLayerError`). Float initializers with at most 256
distinct values are then stored as codebook + uint8 indices where smaller
(:mod:`~nncompress.export.onnx_codebook`; bit-identical outputs). The exported model is
run in ONNX Runtime on the example and compared with torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from nncompress.errors import (
    ModelError,
    NNCError,
    UnsupportedLayerError,
    raise_if_interrupted,
)
from nncompress.export import (
    EXPORTERS,
    LAYER_FORMS,
    Exporter,
    ExportResult,
    qualified_name,
)
from nncompress.export.onnx_codebook import codebook_pass
from nncompress.export.onnx_graph import OPSET
from nncompress.export.onnx_int8 import example_tensors, run_onnx

__all__ = ["UnrolledLSTM", "dense_stand_in", "export_module", "first_unexportable_layer",
           "lstm_stand_in", "module_to_onnx", "with_stand_ins"]


def with_stand_ins(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer of a type in LAYER_FORMS replaced by its
    stand-in (the model itself when none is registered for its layers). The stand-ins are
    made from the original layers and put in place through ``deepcopy``'s memo, so a
    replaced layer is never copied (a CSR tensor cannot be)."""
    found = [(name, m) for name, m in model.named_modules()
             if f"onnx:{qualified_name(type(m))}" in LAYER_FORMS]
    if not found:
        return model
    if found[0][0] == "":
        return LAYER_FORMS.get(f"onnx:{qualified_name(type(model))}")(model)
    memo: dict[int, Any] = {}
    done: list[str] = []
    for name, layer in found:
        if any(name.startswith(outer + ".") for outer in done) or id(layer) in memo:
            continue                       # inside a layer already replaced, or shared
        memo[id(layer)] = LAYER_FORMS.get(f"onnx:{qualified_name(type(layer))}")(layer)
        done.append(name)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """File descriptors 1 and 2 point at /dev/null for the block: PyTorch's exporter
    prints its whole TorchScript graph when an op fails (its log switch is always on)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@contextlib.contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """PyTorch's fused attention fast path off for the block (restored after): in eval
    mode without autograd, ``nn.TransformerEncoderLayer`` would otherwise trace to
    ``aten::_transformer_encoder_layer_fwd``, which has no ONNX form."""
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


def _output_count(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:    # the model does not run on the example: bad input
        raise_if_interrupted(exc)
        raise ModelError(f"{type(model).__name__} fails on the example input "
                         f"{[tuple(a.shape) for a in args]}: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    flat = _flat_tensors(out)
    if flat is None:
        raise UnsupportedLayerError(f"cannot export {type(model).__name__} to ONNX: its "
                                    f"forward returns {type(out).__name__}, not tensors")
    return len(flat)


def _flat_tensors(out: Any) -> list[torch.Tensor] | None:
    """The tensors of a forward's result (nested tuples / lists flattened in order, as
    ONNX outputs are), or None when it holds anything else."""
    if isinstance(out, torch.Tensor):
        return [out]
    if not isinstance(out, (tuple, list)):
        return None
    flat: list[torch.Tensor] = []
    for item in out:
        inner = _flat_tensors(item)
        if inner is None:
            return None
        flat.extend(inner)
    return flat


def _torch_export(model: nn.Module, args: tuple[torch.Tensor, ...],
                  names: list[str] | None = None) -> bytes:
    """``torch.onnx.export`` of ``model`` on ``args`` (dynamic batch), as bytes; ``names``:
    the inputs' names (default ``input`` / ``input0, input1, ...``)."""
    outputs = _output_count(model, args)
    in_names = names or [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    out_names = [f"output{i}" if outputs > 1 else "output" for i in range(outputs)]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet(), _no_attention_fastpath():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=OPSET,
                          input_names=in_names, output_names=out_names,
                          dynamic_axes={n: {0: "batch"} for n in in_names + out_names})
    return buffer.getvalue()


def _layer_calls(model: nn.Module, args: tuple[torch.Tensor, ...]
                 ) -> list[tuple[str, nn.Module, tuple[Any, ...]]]:
    """Every layer's first call in a forward pass, ``(name, layer, positional args)``:
    leaf layers in call order, then containers, innermost (deepest name) first."""
    calls: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
    hooks = []
    for name, layer in model.named_modules():
        if name:
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, name=name: calls.append((name, m, a))))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    seen: set[int] = set()
    first = [c for c in calls if id(c[1]) not in seen and not seen.add(id(c[1]))]
    leaves = [c for c in first if not any(True for _ in c[1].children())]
    containers = [c for c in first if any(True for _ in c[1].children())]
    containers.sort(key=lambda c: -c[0].count("."))     # stable: call order within a depth
    return leaves + containers


def first_unexportable_layer(model: nn.Module, args: tuple[torch.Tensor, ...]
                             ) -> tuple[str, nn.Module, str] | None:
    """The first layer PyTorch cannot export on its own inputs (leaves in call order,
    then containers innermost first): ``(name, layer, first line of the error)``, or
    None."""
    for name, layer, layer_args in _layer_calls(model, args):
        if not layer_args or not all(isinstance(a, torch.Tensor) for a in layer_args):
            continue
        try:
            _torch_export(layer, tuple(layer_args))
        except Exception as exc:   # torch.onnx raises many types
            raise_if_interrupted(exc)
            return name, layer, _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def module_to_onnx(model: nn.Module, args: tuple[torch.Tensor, ...],
                   names: list[str] | None = None) -> bytes:
    """Float ONNX of ``model`` (stand-ins swapped in), checked by ``onnx.checker``."""
    model = with_stand_ins(model.eval())
    try:
        data = _torch_export(model, args, names)
    except NNCError:
        raise
    except Exception as exc:
        raise_if_interrupted(exc)
        culprit = first_unexportable_layer(model, args)
        if culprit is not None:
            name, layer, why = culprit
            raise UnsupportedLayerError(f"cannot export layer {name!r} "
                                        f"({type(layer).__name__}) to ONNX: {why}") from None
        raise UnsupportedLayerError(f"cannot export {type(model).__name__} to ONNX: "
                                    f"{_first_line(exc)}") from None
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


class UnrolledLSTM(nn.Module):
    """An ``nn.LSTM`` with ``proj_size`` (LSTMP: Sak, Senior & Beaufays, 2014) in plain ops,
    unrolled over the input's time steps: ONNX's ``LSTM`` op has no projection. Holds the
    layer itself (its weights); eval semantics (no dropout between layers).

    ``x`` ``[B, T, in]`` (batch first) or ``[T, B, in]``; per layer and direction, with
    gates ``i, f, g, o``: ``c' = s(f) c + s(i) tanh(g)``, ``h' = W_hr (s(o) tanh(c'))``.
    Returns ``output, (h_n [L*D, B, P], c_n [L*D, B, H])`` like the layer."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def _direction(self, x: torch.Tensor, k: str, h: torch.Tensor, c: torch.Tensor,
                   reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lstm = self.lstm
        gates_x = x @ getattr(lstm, f"weight_ih_{k}").t()        # [B, T, 4H]
        if lstm.bias:
            gates_x = gates_x + (getattr(lstm, f"bias_ih_{k}") + getattr(lstm, f"bias_hh_{k}"))
        w_hh, w_hr = getattr(lstm, f"weight_hh_{k}").t(), getattr(lstm, f"weight_hr_{k}").t()
        steps = range(x.shape[1])
        outputs: list[torch.Tensor] = [x] * x.shape[1]
        for t in reversed(steps) if reverse else steps:
            i, f, g, o = (gates_x[:, t] + h @ w_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = (torch.sigmoid(o) * torch.tanh(c)) @ w_hr
            outputs[t] = h
        return torch.stack(outputs, dim=1), h, c

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        lstm = self.lstm
        if x.dim() != 3:
            raise UnsupportedLayerError("cannot export an LSTM with proj_size to ONNX on "
                                        f"unbatched input of shape {tuple(x.shape)}")
        x = x if lstm.batch_first else x.transpose(0, 1)
        dirs = 2 if lstm.bidirectional else 1
        count = lstm.num_layers * dirs
        if hx is None:
            h0 = x.new_zeros((count, x.shape[0], lstm.proj_size))
            c0 = x.new_zeros((count, x.shape[0], lstm.hidden_size))
        else:
            h0, c0 = hx
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        for layer in range(lstm.num_layers):
            outs = []
            for d in range(dirs):
                n = layer * dirs + d
                y, h, c = self._direction(x, f"l{layer}" + ("_reverse" if d else ""),
                                          h0[n], c0[n], reverse=d == 1)
                outs.append(y)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
        out = x if lstm.batch_first else x.transpose(0, 1)
        return out, (torch.stack(hs), torch.stack(cs))


def lstm_stand_in(layer: nn.LSTM) -> nn.Module:
    """``layer`` itself (ONNX ``LSTM``), or :class:`UnrolledLSTM` when it has projections."""
    return UnrolledLSTM(layer) if layer.proj_size > 0 else layer


def dense_stand_in(layer: Any) -> nn.Module:
    """A sparse-engine layer (CSR weights, :mod:`nncompress.kernels.sparse`) as the dense
    layer it computes (``to_dense()``: pruned entries zero): ONNX has no CSR product."""
    return layer.to_dense()


def _export_notes(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[str, ...]:
    """What a user of the float ONNX file should know about ``model``'s export."""
    notes = [f"float32 model (PyTorch's TorchScript ONNX exporter, opset {OPSET}); float "
             "kernels round differently, hence the difference"]
    unrolled = [name for name, m in model.named_modules()
                if isinstance(m, nn.LSTM) and m.proj_size > 0]
    if unrolled:
        notes.append(f"LSTM with projections ({', '.join(unrolled)}) unrolled over time: "
                     "the sequence length is fixed to the example's")
    return tuple(notes)


class _Keywords(nn.Module):
    """A model that takes keyword inputs, called with them positionally (for tracing)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def export_module(model: Any, example: Any) -> ExportResult:
    """The ``onnx:module`` exporter: float ONNX, compared with torch on ``example`` (a
    dict example becomes named positional inputs)."""
    if example is None:
        raise NNCError(f"exporting {type(model).__name__} to ONNX needs an example input "
                       "(it traces one forward pass)")
    args = example_tensors(example)
    model.eval()
    names = None
    if isinstance(example, dict):
        names = list(example)
        model = _Keywords(model, names)
    plain = module_to_onnx(model, args, names)
    packed, report = codebook_pass(onnx.load_from_string(plain))
    onnx.checker.check_model(packed, full_check=True)
    data = packed.SerializeToString() if report.names else plain
    with torch.no_grad():
        want = _flat_tensors(model(*args)) or []
    got = run_onnx(data, *args)
    diff = max(float(np.abs(g.astype(np.float64) - w.double().numpy()).max(initial=0.0))
               for g, w in zip(got, want, strict=True))
    exact = all(np.array_equal(g, w.numpy()) for g, w in zip(got, want, strict=True))
    check = f"ONNX Runtime vs torch: max |diff| {diff:.3g} on {args[0].shape[0]} sample(s)"
    notes = _export_notes(model, args) + tuple(n for n in (report.note(),) if n)
    return ExportResult(data, "onnx:module", exact, diff, check, notes)


def _register() -> None:
    EXPORTERS.register("onnx:module", Exporter(
        "onnx:module", "onnx", "any nn.Module -> float ONNX (torch.onnx, TorchScript exporter)",
        export_module))
    LAYER_FORMS.register(f"onnx:{qualified_name(nn.LSTM)}", lstm_stand_in)
    # by name: importing the sparse engine here would load its kernels for every export
    for sparse in ("nncompress.kernels.sparse.SparseLinear",
                   "nncompress.kernels.sparse_conv.SparseConv"):
        LAYER_FORMS.register(f"onnx:{sparse}", dense_stand_in)


_register()
