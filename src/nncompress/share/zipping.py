"""Multi-task zipping: merge two models that share an input, neuron by neuron.

He, Zhou & Thiele (2018), "Multi-Task Zipping via Layer-wise Neuron Sharing" (MTZ). Two
models ``A`` and ``B`` trained on different tasks over the same input are zipped bottom-up,
one hidden layer at a time. At layer ``l`` each neuron's incoming weights (bias appended)
form a vector; the layer-wise Hessian of a task's error with respect to such a vector is
the second moment of the layer's input, ``H = E[u u^T]`` with ``u = [input; 1]`` measured
on that task's data. Merging neuron ``i`` of ``A`` with neuron ``j`` of ``B`` into one
neuron with weights ``w`` raises the two errors by
``1/2 (w - a_i)^T H_A (w - a_i) + 1/2 (w - b_j)^T H_B (w - b_j)``; the minimiser is
``w* = (H_A + H_B)^-1 (H_A a_i + H_B b_j)`` and the minimum, the merging cost, is
``d[i, j] = 1/2 (a_i - b_j)^T (H_A^-1 + H_B^-1)^-1 (a_i - b_j)``. The pairs with the
smallest costs are merged greedily (each neuron at most once), both tasks are re-trained
briefly, and the next layer is zipped on the new activations. Output layers stay
task-specific.

Partial sharing: after zipping layer ``l`` its outputs are ``[s, a, b]`` (shared, A-only,
B-only neurons). At layer ``l + 1`` A's neurons read ``[s, a]`` and B's read ``[s, b]``;
we write both in the union space ``[s, a, b, 1]`` (zeros where a neuron does not read) so
the cost above applies unchanged, and a merged neuron reads all of ``[s, a, b]``. Each
task's next layer keeps its own outgoing weights of the merged neurons, with its columns
reordered to ``[s, a]`` / ``[s, b]``. (The paper states the method for a shared input;
this is how we extend it to layers below that were only partly shared.)

Convolutions zip the same way with a filter as the neuron: its weight row is the
flattened kernel ``[in_channels * kernel]``, and ``H`` is the second moment of the input
patches it is applied to (all positions). BatchNorms are folded into the layer feeding
them first (Jacob et al. 2018). A Linear after a flattened feature map reads each channel
as a block of columns, and is reordered block-wise.

Scope: models that run as a chain ``layer -> operations -> ... -> Linear`` with layers
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``) and parameter-free operations
between them (activations, pooling, Flatten), e.g. :class:`nncompress.models.MLP` and
:class:`nncompress.models.CNN1d`; anything else raises UnsupportedLayerError rather than
being zipped in part.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.data import Dataset, example_input
from nncompress.errors import RecipeError, UnsupportedLayerError
from nncompress.measure import accuracy, count_macs, count_params
from nncompress.share._zip_layers import (
    ZIPPABLE,
    flat_weight,
    geometry,
    in_units,
    make_like,
    patches,
    unsupported,
    with_input_order,
)
from nncompress.share.zipped import ZipLayer, ZippedPair, spec_of
from nncompress.technique import Context
from nncompress.train import reseed_loader

__all__ = ["ZipLayer", "ZipResult", "ZippedPair", "merge_cost", "zip_models"]


# --------------------------------------------------------------------------- the maths


def merge_cost(h_a: torch.Tensor, h_b: torch.Tensor, w_a: torch.Tensor,
               w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTZ's cost of merging every pair of rows.

    ``h_a``, ``h_b`` ``[d, d]`` (positive definite), ``w_a`` ``[n_a, d]``, ``w_b``
    ``[n_b, d]``. Returns ``cost [n_a, n_b]`` with
    ``cost[i, j] = 1/2 (a_i - b_j)^T (H_A^-1 + H_B^-1)^-1 (a_i - b_j)``, and
    ``(H_A + H_B)^-1`` ``[d, d]``, with which :func:`_merged` forms the merged weights of
    the chosen pairs only.
    """
    s_inv = torch.linalg.inv(h_a + h_b)
    m = h_a @ s_inv @ h_b  # = (H_A^-1 + H_B^-1)^-1
    m = (m + m.T) / 2
    qa = ((w_a @ m) * w_a).sum(1)
    qb = ((w_b @ m) * w_b).sum(1)
    cost = 0.5 * (qa[:, None] + qb[None, :] - 2 * (w_a @ m @ w_b.T))
    return cost.clamp_min(0), s_inv


def _merged(h_a: torch.Tensor, h_b: torch.Tensor, s_inv: torch.Tensor, a: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """``w* = (H_A + H_B)^-1 (H_A a + H_B b)`` for rows ``a``, ``b`` ``[k, d]``."""
    return (s_inv @ (h_a @ a.T + h_b @ b.T)).T


def _greedy_pairs(cost: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """``k`` pairs of smallest cost, each row and column used at most once."""
    order = torch.argsort(cost.flatten(), stable=True).tolist()
    cols = cost.shape[1]
    used_i: set[int] = set()
    used_j: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for flat in order:
        if len(pairs) == k:
            break
        i, j = divmod(flat, cols)
        if i not in used_i and j not in used_j:
            pairs.append((i, j))
            used_i.add(i)
            used_j.add(j)
    return pairs


# --------------------------------------------------------------------------- the chain


def _chain(model: nn.Module, which: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(pre, body)``: leading parameter-free modules, then the layer/activation chain."""
    flat: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        kids = list(m.children())
        if isinstance(m, nn.Sequential) or (kids and not list(m.parameters(recurse=False))
                                            and not isinstance(m, ZIPPABLE)
                                            and all(isinstance(k, nn.Sequential) or
                                                    not list(k.children()) for k in kids)):
            for k in kids:
                walk(k)
        else:
            flat.append(m)

    walk(model)
    for m in flat:
        why = unsupported(m) if list(m.parameters()) else None
        if why is not None:
            raise UnsupportedLayerError(f"multi-task zipping handles Linear/Conv layers with "
                                        f"parameter-free operations between them; model "
                                        f"{which} has {why}")
    first = next((i for i, m in enumerate(flat) if isinstance(m, ZIPPABLE)), None)
    if first is None:
        raise UnsupportedLayerError(f"model {which} has no Linear/Conv layer to zip")
    return flat[:first], flat[first:]


def _check_chain(model: nn.Module, pre: list[nn.Module], body: list[nn.Module],
                 x: torch.Tensor, which: str) -> None:
    """The chain must compute what the model computes (a custom forward would not)."""
    with torch.no_grad():
        was = model.training
        model.eval()
        chained = nn.Sequential(*pre, *body)(x)
        direct = model(x)
        model.train(was)
    if not (isinstance(direct, torch.Tensor) and direct.shape == chained.shape
            and torch.allclose(direct, chained, atol=1e-5, rtol=1e-4)):
        raise UnsupportedLayerError(f"model {which} does not run as a plain chain of its "
                                    f"layers (custom forward); multi-task zipping needs "
                                    f"layer -> activation -> ... -> Linear")


def _split_first(tail: list[nn.Module]) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """``(first layer, the operations after it, the rest starting at the next layer)``."""
    nxt = next((i for i in range(1, len(tail)) if isinstance(tail[i], ZIPPABLE)), len(tail))
    return tail[0], tail[1:nxt], tail[nxt:]


def _fold_norms(model: nn.Module, data: Dataset) -> nn.Module:
    """Fold BatchNorms into the layers feeding them (Jacob et al. 2018), so the chain holds
    only zippable layers; a BatchNorm that cannot fold makes the chain unsupported."""
    from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        fold_batchnorm(model, FoldBatchNormConfig(), Context(data=data, progress=False))
    return model


# --------------------------------------------------------------------------- the procedure


@dataclass(frozen=True)
class ZipResult:
    """The zipped model and what zipping cost and saved.

    ``shared[l] = (merged, n_a, n_b)`` per zipped layer; ``params_*`` count parameters
    (the two models together before); ``macs_*`` per input, both tasks answered;
    accuracies are ``(task A, task B)`` on each task's test split: before zipping,
    ``accuracy_merged[l]`` right after layer ``l`` was merged (before its re-training),
    and after the final re-training. ``merge_error[l]`` is the increase of the two
    tasks' layer-wise errors the merge of layer ``l`` causes,
    ``sum 1/2 (w - a)^T H_A (w - a) + 1/2 (w - b)^T H_B (w - b)`` over merged pairs
    (measured with the data's Hessians whatever the criterion).
    """

    model: ZippedPair
    shared: tuple[tuple[int, int, int], ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    accuracy_before: tuple[float, float]
    accuracy_merged: tuple[tuple[float, float], ...]
    accuracy_after: tuple[float, float]
    merge_error: tuple[float, ...]


def _hessian(pair: ZippedPair, layer: nn.Module, loader, damping: float) -> torch.Tensor:
    """``E[u u^T]`` of ``u = [patch of (s, a, b), 1]`` over ``loader`` and every position
    ``layer`` applies at (float64), damped by ``damping`` x its mean diagonal."""
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for x, _ in loader:
            u = patches(layer, torch.cat(pair.features(x), 1)).double()
            u = torch.cat([u, torch.ones(len(u), 1, dtype=u.dtype)], 1)
            total = u.T @ u if total is None else total + u.T @ u
            count += len(u)
    assert total is not None
    h = total / count
    return h + damping * float(h.diagonal().mean()) * torch.eye(len(h), dtype=h.dtype)


def _union_weights(layer: nn.Module, widths: tuple[int, int, int], own: int) -> torch.Tensor:
    """Rows ``[units, (|s|+|a|+|b|) * kernel + 1]``: the layer reads ``[s, own part]``;
    zeros on the other task's part."""
    ws, wa, wb = widths
    w = layer.weight.detach().double()
    union = w.new_zeros(w.shape[0], ws + wa + wb, *w.shape[2:])
    union[:, :ws] = w[:, :ws]
    start, width = (ws, wa) if own == 0 else (ws + wa, wb)
    union[:, start:start + width] = w[:, ws:ws + width]
    return torch.cat([union.reshape(w.shape[0], -1), flat_weight(layer)[:, -1:]], 1)


def _check_pair(layer_a: nn.Module, layer_b: nn.Module, act_a: list[nn.Module],
                act_b: list[nn.Module], depth: int) -> None:
    if geometry(layer_a) != geometry(layer_b):
        raise UnsupportedLayerError(f"zip: layer {depth + 1} differs between the models: "
                                    f"{geometry(layer_a)} vs {geometry(layer_b)}")
    if [type(m) for m in act_a] != [type(m) for m in act_b]:
        raise UnsupportedLayerError(f"zip: the two models apply different operations after "
                                    f"layer {depth + 1}")


def _zip_layer(pair: ZippedPair, data_a: Dataset, data_b: Dataset, share: float,
               damping: float,
               criterion: str) -> tuple[ZippedPair, tuple[int, int, int], float]:
    lin_a, act_a, rest_a = _split_first(list(pair.tail_a))
    lin_b, act_b, rest_b = _split_first(list(pair.tail_b))
    _check_pair(lin_a, lin_b, act_a, act_b, len(pair.layers))
    s, a, b = pair.features(example_input(data_a, 1))
    widths = (s.shape[1], a.shape[1], b.shape[1])
    h_a = _hessian(pair, lin_a, data_a.train, damping)
    h_b = _hessian(pair, lin_a, data_b.train, damping)
    # the ablation ("euclidean"): pairs by distance, merged weights = the average
    g_a, g_b = (h_a, h_b) if criterion == "hessian" else (torch.eye(len(h_a)).double(),) * 2
    w_a, w_b = _union_weights(lin_a, widths, 0), _union_weights(lin_b, widths, 1)
    k = round(share * min(len(w_a), len(w_b)))
    cost, s_inv = merge_cost(g_a, g_b, w_a, w_b)
    pairs = _greedy_pairs(cost, k)
    ia = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    jb = torch.tensor([j for _, j in pairs], dtype=torch.long)
    taken_a, taken_b = set(ia.tolist()), set(jb.tolist())
    ra = torch.tensor([i for i in range(len(w_a)) if i not in taken_a], dtype=torch.long)
    rb = torch.tensor([j for j in range(len(w_b)) if j not in taken_b], dtype=torch.long)
    shared, error = None, 0.0
    if k:
        merged = _merged(g_a, g_b, s_inv, w_a[ia], w_b[jb])
        da, db = merged - w_a[ia], merged - w_b[jb]
        error = 0.5 * float(((da @ h_a) * da).sum() + ((db @ h_b) * db).sum())
        shared = make_like(lin_a, merged, sum(widths))
    own_a, own_b = flat_weight(lin_a), flat_weight(lin_b)
    only_a = make_like(lin_a, own_a[ra], in_units(lin_a)) if len(ra) else None
    only_b = make_like(lin_b, own_b[rb], in_units(lin_b)) if len(rb) else None
    layer = ZipLayer(shared, only_a, only_b, nn.Sequential(*copy.deepcopy(act_a)))
    tail_a = nn.Sequential(with_input_order(rest_a[0], torch.cat([ia, ra]), len(w_a)),
                           *rest_a[1:])
    tail_b = nn.Sequential(with_input_order(rest_b[0], torch.cat([jb, rb]), len(w_b)),
                           *rest_b[1:])
    return (ZippedPair(pair.pre, [*pair.layers, layer], tail_a, tail_b),
            (k, len(w_a), len(w_b)), error)


def _retrain(pair: ZippedPair, data_a: Dataset, data_b: Dataset, epochs: int, lr: float,
             seed: int) -> None:
    """Both tasks at once: each step sums task A's loss on an A batch and task B's on a B
    batch (the shorter loader restarts); Adam, ``epochs`` passes over the longer one."""
    if epochs == 0:
        return
    torch.manual_seed(seed)
    reseed_loader(data_a.train, seed)
    reseed_loader(data_b.train, seed + 1)
    optimizer = torch.optim.Adam(pair.parameters(), lr=lr)
    steps = max(len(data_a.train), len(data_b.train))
    pair.train()
    for _ in range(epochs):
        batches = zip(itertools.cycle(data_a.train), itertools.cycle(data_b.train))
        for (xa, ya), (xb, yb) in itertools.islice(batches, steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (F.cross_entropy(pair.task(0)(xa), ya)
                    + F.cross_entropy(pair.task(1)(xb), yb))
            loss.backward()
            optimizer.step()
    pair.eval()


def _accuracies(pair: ZippedPair, data_a: Dataset, data_b: Dataset) -> tuple[float, float]:
    return accuracy(pair.task(0), data_a.test), accuracy(pair.task(1), data_b.test)


def _check_settings(share: float | Sequence[float], data_a: Dataset, data_b: Dataset,
                    retrain_epochs: int, final_epochs: int, damping: float,
                    criterion: str) -> None:
    if criterion not in ("hessian", "euclidean"):
        raise RecipeError(f"zip: unknown criterion {criterion!r}; known: euclidean, hessian")
    fractions = [share] if isinstance(share, (int, float)) else list(share)
    if not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float))
                            or not 0.0 <= f <= 1.0 for f in fractions):
        raise RecipeError(f"zip: share must be fractions in [0, 1], got {share!r}")
    if data_a.input_shape != data_b.input_shape:
        raise RecipeError(f"zip: the tasks must share an input; shapes "
                          f"{data_a.input_shape} and {data_b.input_shape} differ")
    for value, what in ((retrain_epochs, "retrain_epochs"), (final_epochs, "final_epochs")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RecipeError(f"zip: {what} must be a non-negative integer, got {value!r}")
    if not damping > 0:
        raise RecipeError(f"zip: damping must be > 0, got {damping!r}")


def _fractions(share: float | Sequence[float], hidden: int) -> list[float]:
    """One fraction per zipped layer (a single number applies to every hidden layer)."""
    fractions = [share] * hidden if isinstance(share, (int, float)) else list(share)
    if not 1 <= len(fractions) <= hidden:
        raise RecipeError(f"zip: share gives {len(fractions)} fraction(s) but the models have "
                          f"{hidden} hidden layer(s) in common to zip (output layers stay "
                          f"task-specific)")
    return [float(f) for f in fractions]


def _unzipped_chain(model: nn.Module, data: Dataset, x: torch.Tensor,
                    which: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """A copy of ``model`` as ``(pre, body)``, BatchNorms folded, checked to be a chain of
    savable parts."""
    model = _fold_norms(copy.deepcopy(model).eval(), data)
    pre, body = _chain(model, which)
    _check_chain(model, pre, body, x, which)
    for op in (m for m in (*pre, *body) if not isinstance(m, ZIPPABLE)):
        spec_of(op)  # the zipped model must be savable: every operation has a record
    return pre, body


def zip_models(model_a: nn.Module, model_b: nn.Module, data_a: Dataset, data_b: Dataset, *,
               share: float | Sequence[float], damping: float = 1e-3,
               retrain_epochs: int = 2, final_epochs: int = 5, lr: float = 1e-3,
               criterion: str = "hessian", seed: int = 0) -> ZipResult:
    """Zip two chain models (Linear / Conv layers) that take the same input (MTZ, He,
    Zhou & Thiele 2018).

    ``share``: fraction of ``min(n_a, n_b)`` neurons merged in each hidden layer, one
    number for all or one per layer from the input side (later layers stay unzipped).
    After each layer both tasks re-train ``retrain_epochs`` epochs, and ``final_epochs``
    at the end. ``criterion="euclidean"`` replaces both Hessians by the identity (pairs
    by Euclidean distance, merged weights averaged): an ablation, to see what the Hessian
    buys. The input models are not modified.
    """
    _check_settings(share, data_a, data_b, retrain_epochs, final_epochs, damping, criterion)
    x = example_input(data_a, 2)
    parts = [_unzipped_chain(model, data, x, which)
             for model, data, which in ((model_a, data_a, "A"), (model_b, data_b, "B"))]
    if [type(m) for m in parts[0][0]] != [type(m) for m in parts[1][0]]:
        raise UnsupportedLayerError("zip: the two models prepare their input differently")
    fractions = _fractions(share, min(sum(isinstance(m, ZIPPABLE) for m in body) - 1
                                      for _, body in parts))
    pair = ZippedPair(nn.Sequential(*parts[0][0]), [], nn.Sequential(*parts[0][1]),
                      nn.Sequential(*parts[1][1])).eval()
    before = _accuracies(pair, data_a, data_b)
    macs_before = (count_macs(model_a, x[:1]).total + count_macs(model_b, x[:1]).total)
    params_before = count_params(model_a).total + count_params(model_b).total
    shared = []
    merged_acc = []
    errors: list[float] = []
    for depth, fraction in enumerate(fractions):
        pair, counts, error = _zip_layer(pair, data_a, data_b, fraction, damping,
                                          criterion)
        shared.append(counts)
        errors.append(error)
        merged_acc.append(_accuracies(pair.eval(), data_a, data_b))
        if depth < len(fractions) - 1:
            _retrain(pair, data_a, data_b, retrain_epochs, lr, seed + depth)
    _retrain(pair, data_a, data_b, final_epochs, lr, seed + len(fractions))
    return ZipResult(pair, tuple(shared), params_before, count_params(pair).total,
                     macs_before, count_macs(pair, x[:1]).total, before, tuple(merged_acc),
                     _accuracies(pair, data_a, data_b), tuple(errors))

