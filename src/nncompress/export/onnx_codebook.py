"""Codebook form of an exported float ONNX graph: a float32 initializer with at most 256
distinct values is stored as a float32 codebook plus uint8 indices of the tensor's shape,
``Gather(codebook, Cast(indices, int32))``, wherever that is smaller than the dense tensor.

This is the weight-sharing storage of Deep Compression (Han, Mao & Dally, 2016, "Deep
compression", section 3: ``k`` shared values and ``log2 k``-bit indices; here the indices
take a whole byte, which ONNX can hold without custom operators). The values are exactly
the same: distinct values are found on the float32 *bit patterns* (``-0.0`` and ``+0.0``
stay apart, as do NaN payloads), and ``Gather`` copies them. The ``Cast`` is there
because ONNX's ``Gather`` takes int32 / int64 indices only. Both nodes read constants
only, so ONNX Runtime folds them back into the dense tensor when it creates a session
(its constant-folding pass, on at every optimization level above "disabled"): the file
is smaller, the running model and its speed are unchanged.

Weight-shared layers (``weight_sharing``), binarized and low-bit layers (their float
stand-ins hold ``2**k`` values), and HashedNets with at most 256 buckets all shrink about
4x; a dense float model has no such tensor and is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MAX_VALUES", "CodebookReport", "codebook_pass", "codebook_tensor"]

#: At most this many distinct values: the indices fit in one unsigned byte.
MAX_VALUES = 256


@dataclass(frozen=True)
class CodebookReport:
    """What :func:`codebook_pass` did: the initializers it replaced (``names``) and their
    serialized bytes before (dense) and after (codebook, indices and the two nodes)."""

    names: tuple[str, ...]
    bytes_before: int
    bytes_after: int

    def note(self) -> str | None:
        """One line for :attr:`nncompress.export.ExportResult.notes` (None: nothing done)."""
        if not self.names:
            return None
        shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
        return (f"{len(self.names)} tensor(s) stored as codebook + uint8 indices "
                f"({shown}): {self.bytes_after / 1024:.2f} KiB instead of "
                f"{self.bytes_before / 1024:.2f} KiB (ONNX Runtime folds them back into "
                "dense tensors at session creation)")


def codebook_tensor(array: np.ndarray, max_values: int = MAX_VALUES
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codebook float32 [k], indices uint8 of array's shape)`` with
    ``codebook[indices]`` bit-identical to ``array`` (float32), or None when it has more
    than ``max_values`` distinct bit patterns."""
    if array.dtype != np.float32 or array.size == 0:
        return None
    bits = np.ascontiguousarray(array).view(np.uint32)
    values, indices = np.unique(bits.reshape(-1), return_inverse=True)
    if len(values) > max_values:
        return None
    return values.view(np.float32), indices.astype(np.uint8).reshape(array.shape)


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _replacement(init: TensorProto, taken: set[str], max_values: int
                 ) -> tuple[list[TensorProto], list[onnx.NodeProto]] | None:
    """The codebook and indices initializers and the Cast + Gather nodes producing
    ``init.name``, or None when ``init`` is not float32 or has too many values."""
    if init.data_type != TensorProto.FLOAT or init.data_location == TensorProto.EXTERNAL:
        return None
    found = codebook_tensor(numpy_helper.to_array(init), max_values)
    if found is None:
        return None
    codebook, indices = found
    book = numpy_helper.from_array(codebook, _fresh(f"{init.name}.codebook", taken))
    idx = numpy_helper.from_array(indices, _fresh(f"{init.name}.indices", taken))
    wide = _fresh(f"{init.name}.indices_int32", taken)
    nodes = [helper.make_node("Cast", [idx.name], [wide], to=TensorProto.INT32,
                              name=_fresh(f"{init.name}.cast", taken)),
             helper.make_node("Gather", [book.name, wide], [init.name], axis=0,
                              name=_fresh(f"{init.name}.gather", taken))]
    return [book, idx], nodes


def _names_in(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def codebook_pass(model: onnx.ModelProto, max_values: int = MAX_VALUES
                  ) -> tuple[onnx.ModelProto, CodebookReport]:
    """A copy of ``model`` whose main-graph float32 initializers with at most
    ``max_values`` distinct values are ``Gather``\\ s over a codebook where that serializes
    smaller (initializers that are also graph inputs, i.e. overridable, are left alone),
    and the report of what changed. ``model`` itself is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    overridable = {v.name for v in graph.input}
    taken = _names_in(graph)
    kept: list[TensorProto] = []
    added: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    names: list[str] = []
    before = after = 0
    for init in graph.initializer:
        found = None if init.name in overridable else _replacement(init, taken, max_values)
        size = sum(p.ByteSize() for p in (*found[0], *found[1])) if found else 0
        if found is None or size >= init.ByteSize():
            kept.append(init)
            continue
        names.append(init.name)
        before += init.ByteSize()
        after += size
        added.extend(found[0])
        nodes.extend(found[1])
    if not names:
        return out, CodebookReport((), 0, 0)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + added)
    rest = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes + rest)           # constants first: still topologically sorted
    return out, CodebookReport(tuple(names), before, after)
