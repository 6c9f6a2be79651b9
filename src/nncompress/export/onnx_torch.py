"""Any ``nn.Module`` to float ONNX through PyTorch's TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``: it works offline; the dynamo exporter needs
onnxscript, which nncompress does not install), batch dimension dynamic, opset 17.

Layers registered in :data:`nncompress.export.LAYER_FORMS` are swapped for their
traceable stand-ins on a copy first. When PyTorch cannot export the model, every leaf
layer is exported alone on the inputs it received in a forward pass, in call order, and
the first that fails is named (:class:`~nncompress.errors.UnsupportedLayerError`).
The exported model is run in ONNX Runtime on the example and compared with torch.
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

from nncompress.errors import ModelError, NNCError, UnsupportedLayerError
from nncompress.export import (
    EXPORTERS,
    LAYER_FORMS,
    Exporter,
    ExportResult,
    qualified_name,
)
from nncompress.export.onnx_graph import OPSET
from nncompress.export.onnx_int8 import example_tensors, run_onnx

__all__ = ["export_module", "first_unexportable_layer", "module_to_onnx", "with_stand_ins"]


def with_stand_ins(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer of a type in LAYER_FORMS replaced by its
    stand-in (the model itself when none is registered for its layers)."""
    found = [(name, m) for name, m in model.named_modules()
             if f"onnx:{qualified_name(type(m))}" in LAYER_FORMS]
    if not found:
        return model
    if found[0][0] == "":
        return LAYER_FORMS.get(f"onnx:{qualified_name(type(model))}")(model)
    model = copy.deepcopy(model)
    replaced: list[str] = []
    for name, _ in found:
        if any(name.startswith(done + ".") for done in replaced):
            continue                       # inside a layer already replaced
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        setattr(parent, attr, LAYER_FORMS.get(f"onnx:{qualified_name(type(layer))}")(layer))
        replaced.append(name)
    return model


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


def _output_count(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:    # the model does not run on the example: bad input
        raise ModelError(f"{type(model).__name__} fails on the example input "
                         f"{[tuple(a.shape) for a in args]}: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    raise UnsupportedLayerError(f"cannot export {type(model).__name__} to ONNX: its forward "
                                f"returns {type(out).__name__}, not tensors")


def _torch_export(model: nn.Module, args: tuple[torch.Tensor, ...],
                  names: list[str] | None = None) -> bytes:
    """``torch.onnx.export`` of ``model`` on ``args`` (dynamic batch), as bytes; ``names``:
    the inputs' names (default ``input`` / ``input0, input1, ...``)."""
    outputs = _output_count(model, args)
    in_names = names or [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    out_names = [f"output{i}" if outputs > 1 else "output" for i in range(outputs)]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=OPSET,
                          input_names=in_names, output_names=out_names,
                          dynamic_axes={n: {0: "batch"} for n in in_names + out_names})
    return buffer.getvalue()


def _leaf_calls(model: nn.Module, args: tuple[torch.Tensor, ...]
                ) -> list[tuple[str, nn.Module, tuple[Any, ...]]]:
    """Every leaf layer's call in a forward pass: ``(name, layer, positional args)``."""
    calls: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
    hooks = []
    for name, layer in model.named_modules():
        if name and not any(True for _ in layer.children()):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, name=name: calls.append((name, m, a))))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return calls


def first_unexportable_layer(model: nn.Module, args: tuple[torch.Tensor, ...]
                             ) -> tuple[str, nn.Module, str] | None:
    """The first leaf layer (in call order) that PyTorch cannot export on its own inputs:
    ``(name, layer, first line of the error)``, or None."""
    seen: set[int] = set()
    for name, layer, layer_args in _leaf_calls(model, args):
        if id(layer) in seen or not all(isinstance(a, torch.Tensor) for a in layer_args):
            continue
        seen.add(id(layer))
        try:
            _torch_export(layer, tuple(layer_args))
        except Exception as exc:   # torch.onnx raises many types
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
        culprit = first_unexportable_layer(model, args)
        if culprit is not None:
            name, layer, why = culprit
            raise UnsupportedLayerError(f"cannot export layer {name!r} "
                                        f"({type(layer).__name__}) to ONNX: {why}") from None
        raise UnsupportedLayerError(f"cannot export {type(model).__name__} to ONNX: "
                                    f"{_first_line(exc)}") from None
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


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
    data = module_to_onnx(model, args, names)
    with torch.no_grad():
        want = model(*args)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = run_onnx(data, *args)
    diff = max(float(np.abs(g.astype(np.float64) - w.double().numpy()).max(initial=0.0))
               for g, w in zip(got, want, strict=True))
    exact = all(np.array_equal(g, w.numpy()) for g, w in zip(got, want, strict=True))
    check = f"ONNX Runtime vs torch: max |diff| {diff:.3g} on {args[0].shape[0]} sample(s)"
    return ExportResult(data, "onnx:module", exact, diff, check,
                        ("float32 model (PyTorch's TorchScript ONNX exporter, opset "
                         f"{OPSET}); float kernels round differently, hence the difference",))


EXPORTERS.register("onnx:module", Exporter(
    "onnx:module", "onnx", "any nn.Module -> float ONNX (torch.onnx, TorchScript exporter)",
    export_module))
