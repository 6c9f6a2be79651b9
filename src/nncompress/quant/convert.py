"""Float model -> integer :class:`~nncompress.quant.program.Program` (Jacob et al., 2018).

Three steps, none of which changes the model handed in:

1. :func:`trace`: ``torch.fx`` symbolic trace (PyTorch layers are leaves, GRU/LSTM included);
   a model fx cannot trace is refused with fx's reason.
2. :func:`calibrate`: run the traced model on calibration batches and record, for every
   node, its observed range (an observer from :mod:`nncompress.quant.observers`: ``minmax``,
   ``percentile``, ``mse``, ``kl``) and its per-sample shape.
3. :func:`build_program`: map every node to integer ops (the rules are in
   :mod:`nncompress.quant.convert_rules`, one table); a ReLU right after a Linear/Conv is
   fused into its clamp, a scalar multiplication after a matmul into its multiplier. A
   node no rule covers raises :class:`~nncompress.errors.UnsupportedLayerError` naming it,
   before anything is returned. BatchNorm must be folded first (``fold_batchnorm``).

QAT (:mod:`nncompress.quant.qat`) supplies the ranges learnt during training instead of
step 2's observers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from nncompress import inputs
from nncompress.errors import UnsupportedLayerError
from nncompress.quant.program import Program

__all__ = ["Calibration", "build_program", "calibrate", "convert", "positional",
           "quantization_points", "trace"]


class _Tracer(fx.Tracer):
    """PyTorch's own layers are leaves (fx's default), and so are the recurrent layers.

    With ``example`` inputs, Python control flow on traced values (``if x.dim() == 3``,
    as in PyTorch's attention) is decided by running the graph traced so far on the
    example: the program is specialised to inputs shaped like the calibration data, as an
    exported model is.
    """

    def __init__(self, example: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__()
        self.example = example

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Layers with a conversion rule are leaves; any other module (a user's block, or
        a PyTorch container such as ``nn.TransformerEncoder``) is traced through."""
        from nncompress.quant.convert_ops import RULES
        if isinstance(m, nn.RNNBase):
            return True
        return type(m) in RULES or (super().is_leaf_module(m, qualname)
                                    and next(m.children(), None) is None)

    def _concrete(self, obj: fx.Proxy) -> Any:
        target = obj.node   # an attribute proxy creates its node on first access
        graph = fx.Graph()
        copied: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, copied)
        graph.output(copied[target])
        # an active trace patches Module.__call__ / __getattr__: undo that while running
        from torch.fx._symbolic_trace import _maybe_revert_all_patches
        with torch.no_grad(), _maybe_revert_all_patches():
            return fx.GraphModule(self.root, graph)(*self.example)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.example is None:
            return super().to_bool(obj)
        return bool(self._concrete(obj))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self) if self.example is not None else super().proxy(node)


class _SizedProxy(fx.Proxy):
    """A proxy whose ``len()`` is read from the example run (``if len(x.size()) == 2``)."""

    def __len__(self) -> int:
        return len(self.tracer._concrete(self))


def trace(model: nn.Module, example: tuple[torch.Tensor, ...] | None = None
          ) -> fx.GraphModule:
    """``model`` as an fx graph (a new module sharing the model's parameters); control flow
    on traced values is decided on ``example`` when given (see :class:`_Tracer`)."""
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer(example).trace(model)
    except Exception as exc:  # fx raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedLayerError(
            f"int8 conversion needs a model torch.fx can trace; {type(model).__name__} "
            f"cannot be traced: {first[:200]}") from None
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if example is not None:
        _expand_attention(gm, example)
    return gm


def _expand_attention(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) rewritten as the
    ops it stands for -- ``softmax(q @ k^T * scale) @ v`` -- so each gets a calibrated range
    and an integer rule (the scale is read from ``q``'s width on the example)."""
    import operator

    import torch.nn.functional as F
    from torch.fx.passes.shape_prop import ShapeProp
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is F.scaled_dot_product_attention]
    plain = [n for n in nodes if len(n.args) == 3 and not any(
        n.kwargs.get(k) for k in ("attn_mask", "dropout_p", "is_causal"))]
    if not plain:
        return
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    gm.train(was_training)
    for node in plain:
        q, k, v = node.args
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(q.meta["tensor_meta"].shape[-1])
        with gm.graph.inserting_before(node):
            kt = gm.graph.call_method("transpose", (k, -2, -1))
            scores = gm.graph.call_function(operator.matmul, (q, kt))
            scaled = gm.graph.call_function(operator.mul, (scores, float(scale)))
            attn = gm.graph.call_method("softmax", (scaled, -1))
            out = gm.graph.call_function(operator.matmul, (attn, v))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()


@dataclass
class Calibration:
    """Per node name: observed ``(lo, hi)`` range and per-sample shape (batch dim dropped)."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: dict[str, Any], observer: str,
                 cal: Calibration, options: Mapping[str, Any]) -> None:
        super().__init__(gm)
        self._observers, self._observer, self._cal = observers, observer, cal
        self._options = options

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if n.name not in self._observers:
                from nncompress.quant.observers import make_observer
                self._observers[n.name] = make_observer(self._observer, **self._options)
            self._observers[n.name].update(out.detach())
        if isinstance(out, torch.Tensor):
            self._cal.shapes[n.name] = tuple(out.shape)
            self._cal.dtypes[n.name] = "float32" if out.is_floating_point() else "int64"
        return out


def calibrate(gm: fx.GraphModule, batches: Iterable[inputs.Inputs], observer: str = "minmax",
              **options: Any) -> Calibration:
    """Observe every float tensor node of ``gm`` over ``batches`` (eval mode, no grad)."""
    observers: dict[str, Any] = {}
    cal = Calibration()
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        for x in batches:
            _Recorder(gm, observers, observer, cal, options).run(*positional(gm, x))
    gm.train(was_training)
    cal.ranges = {k: tuple(map(float, o.range())) for k, o in observers.items()}
    return cal


def positional(gm: fx.GraphModule, x: inputs.Inputs) -> tuple[torch.Tensor, ...]:
    """A batch's inputs in the order of ``gm``'s placeholders (a dict by their names)."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, dict):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return tuple(x[name] for name in names if name in x)
    return tuple(x)


def positional_model(model: nn.Module, x: inputs.Inputs) -> tuple[torch.Tensor, ...]:
    """:func:`positional` for a model not traced yet (a dict by its forward's names)."""
    if isinstance(x, dict):
        import inspect
        names = list(inspect.signature(model.forward).parameters)
        return tuple(x[name] for name in names if name in x)
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def build_program(gm: fx.GraphModule, calibration: Calibration, *,
                  per_channel: bool = True) -> tuple[Program, list[str]]:
    """The integer program of ``gm`` with ``calibration``'s ranges, and the log lines (layers
    kept in float and why, fusions). Raises UnsupportedLayerError naming the first node no
    rule covers."""
    from nncompress.quant.convert_rules import Builder
    builder = Builder(gm, calibration, per_channel=per_channel)
    for node in gm.graph.nodes:
        builder.visit(node)
    return builder.finish()


def quantization_points(gm: fx.GraphModule, calibration: Calibration) -> list[str]:
    """The nodes whose calibrated range the program uses, in graph order: where QAT puts
    its fake quantizers (:mod:`nncompress.quant.qat`)."""
    from nncompress.quant.convert_rules import Builder
    builder = Builder(gm, calibration, per_channel=True)
    for node in gm.graph.nodes:
        builder.visit(node)
    return list(dict.fromkeys(builder.used))


def convert(model: nn.Module, batches: Iterable[inputs.Inputs], *, observer: str = "minmax",
            per_channel: bool = True, **options: Any) -> tuple[Program, list[str]]:
    """Trace, calibrate and build: ``model``'s integer program and its log. The model is
    not changed (fold BatchNorm into it first: ``fold_batchnorm``)."""
    batches = list(batches)
    gm = trace(model, positional_model(model, batches[0]) if batches else None)
    return build_program(gm, calibrate(gm, batches, observer, **options),
                         per_channel=per_channel)
