"""Multi-task zipping: merge two fully connected models that share an input.

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

Scope: models that run as a chain ``[Flatten] -> Linear -> activations -> ... -> Linear``
(e.g. :class:`nncompress.models.MLP`); anything else raises UnsupportedLayerError rather
than being zipped in part.
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
from nncompress.errors import ModelError, RecipeError, UnsupportedLayerError
from nncompress.measure import accuracy, count_macs, count_params
from nncompress.train import reseed_loader

__all__ = ["ZipLayer", "ZipResult", "ZippedPair", "merge_cost", "zip_models"]


class ZipLayer(nn.Module):
    """One zipped layer: ``shared`` reads ``[s, a, b]``, ``only_a`` reads ``[s, a]``,
    ``only_b`` reads ``[s, b]`` (each ``[B, width]``; an absent part is ``None``); the same
    elementwise ``activation`` follows all three."""

    def __init__(self, shared: nn.Linear | None, only_a: nn.Linear | None,
                 only_b: nn.Linear | None, activation: nn.Module) -> None:
        super().__init__()
        self.shared, self.only_a, self.only_b = shared, only_a, only_b
        self.activation = activation

    def _run(self, layer: nn.Linear | None, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if layer is None:
            return parts[0].new_zeros(len(parts[0]), 0)
        return self.activation(layer(torch.cat(list(parts), dim=1)))

    def forward(self, s: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._run(self.shared, (s, a, b)), self._run(self.only_a, (s, a)),
                self._run(self.only_b, (s, b)))


class ZippedPair(nn.Module):
    """Two task models zipped: ``forward(x)`` returns ``(logits_a, logits_b)``.

    ``pre`` (e.g. Flatten) runs once on the shared input ``x``; ``layers`` are the zipped
    :class:`ZipLayer` s; ``tail_a`` / ``tail_b`` are each task's remaining layers, reading
    ``[s, a]`` / ``[s, b]``. :meth:`task` gives one task's single-output view.
    """

    def __init__(self, pre: nn.Module, layers: Sequence[ZipLayer], tail_a: nn.Sequential,
                 tail_b: nn.Sequential) -> None:
        super().__init__()
        self.pre, self.layers = pre, nn.ModuleList(layers)
        self.tail_a, self.tail_b = tail_a, tail_b

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s, a, b)`` after the zipped layers (before any zipping: ``(x, [], [])``)."""
        s = self.pre(x)
        a = b = s.new_zeros(len(s), 0)
        for layer in self.layers:
            s, a, b = layer(s, a, b)
        return s, a, b

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, a, b = self.features(x)
        return self.tail_a(torch.cat([s, a], 1)), self.tail_b(torch.cat([s, b], 1))

    def task(self, index: int) -> nn.Module:
        """Task ``index`` (0 = A, 1 = B) as a module returning that task's logits only."""
        if index not in (0, 1):
            raise ModelError(f"a zipped pair has tasks 0 and 1, got {index!r}")
        return _TaskView(self, index)


class _TaskView(nn.Module):
    def __init__(self, pair: ZippedPair, index: int) -> None:
        super().__init__()
        self.pair, self.index = pair, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, a, b = self.pair.features(x)
        if self.index == 0:
            return self.pair.tail_a(torch.cat([s, a], 1))
        return self.pair.tail_b(torch.cat([s, b], 1))


# --------------------------------------------------------------------------- the maths


def merge_cost(h_a: torch.Tensor, h_b: torch.Tensor, w_a: torch.Tensor,
               w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTZ's cost of merging every pair and the merged weights.

    ``h_a``, ``h_b`` ``[d, d]`` (positive definite), ``w_a`` ``[n_a, d]``, ``w_b``
    ``[n_b, d]``. Returns ``cost [n_a, n_b]`` with
    ``cost[i, j] = 1/2 (a_i - b_j)^T (H_A^-1 + H_B^-1)^-1 (a_i - b_j)`` and
    ``merged [n_a, n_b, d]`` is not formed: use :func:`_merged` for the chosen pairs.
    Also returns ``(H_A + H_B)^-1`` ``[d, d]`` for :func:`_merged`.
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
    """``(pre, body)``: leading parameter-free modules, then the Linear/activation chain."""
    flat: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        kids = list(m.children())
        if isinstance(m, nn.Sequential) or (kids and not list(m.parameters(recurse=False))
                                            and not isinstance(m, nn.Linear)
                                            and all(isinstance(k, nn.Sequential) or
                                                    not list(k.children()) for k in kids)):
            for k in kids:
                walk(k)
        else:
            flat.append(m)

    walk(model)
    for m in flat:
        if not isinstance(m, nn.Linear) and list(m.parameters()):
            raise UnsupportedLayerError(f"multi-task zipping handles Linear layers with "
                                        f"parameter-free activations; model {which} has "
                                        f"{type(m).__name__}")
    first = next((i for i, m in enumerate(flat) if isinstance(m, nn.Linear)), None)
    if first is None:
        raise UnsupportedLayerError(f"model {which} has no Linear layer to zip")
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
                                    f"Flatten -> Linear -> activation -> ... -> Linear")


def _split_first(tail: list[nn.Module]) -> tuple[nn.Linear, list[nn.Module], list[nn.Module]]:
    """``(first Linear, its activations, the rest starting at the next Linear)``."""
    linear = tail[0]
    assert isinstance(linear, nn.Linear)
    nxt = next((i for i in range(1, len(tail)) if isinstance(tail[i], nn.Linear)), len(tail))
    return linear, tail[1:nxt], tail[nxt:]


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _with_columns(layer: nn.Linear, order: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight.detach()[:, order], layer.bias.detach())


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


def _hessian(pair: ZippedPair, loader, damping: float) -> torch.Tensor:
    """``E[u u^T]`` of ``u = [s, a, b, 1]`` over ``loader`` (float64), damped."""
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for x, _ in loader:
            s, a, b = pair.features(x)
            u = torch.cat([s, a, b, torch.ones(len(s), 1)], 1).double()
            total = u.T @ u if total is None else total + u.T @ u
            count += len(u)
    assert total is not None
    h = total / count
    return h + damping * float(h.diagonal().mean()) * torch.eye(len(h), dtype=h.dtype)


def _union_weights(layer: nn.Linear, widths: tuple[int, int, int], own: int) -> torch.Tensor:
    """Rows ``[n, |s|+|a|+|b|+1]``: the layer reads ``[s, own part]``; zeros elsewhere."""
    ws, wa, wb = widths
    w = layer.weight.detach().double()
    out = torch.zeros(w.shape[0], ws + wa + wb + 1, dtype=torch.float64)
    out[:, :ws] = w[:, :ws]
    start = ws if own == 0 else ws + wa
    width = wa if own == 0 else wb
    out[:, start:start + width] = w[:, ws:ws + width]
    out[:, -1] = layer.bias.detach().double()
    return out


def _zip_layer(pair: ZippedPair, data_a: Dataset, data_b: Dataset, share: float,
               damping: float,
               criterion: str) -> tuple[ZippedPair, tuple[int, int, int], float]:
    lin_a, act_a, rest_a = _split_first(list(pair.tail_a))
    lin_b, act_b, rest_b = _split_first(list(pair.tail_b))
    if [type(m) for m in act_a] != [type(m) for m in act_b]:
        raise UnsupportedLayerError(f"zip: the two models use different activations after "
                                    f"{len(pair.layers) + 1} Linear layer(s)")
    s, a, b = pair.features(example_input(data_a, 1))
    widths = (s.shape[1], a.shape[1], b.shape[1])
    h_a = _hessian(pair, data_a.train, damping)
    h_b = _hessian(pair, data_b.train, damping)
    # the ablation ("euclidean"): pairs by distance, merged weights = the average
    g_a, g_b = (h_a, h_b) if criterion == "hessian" else (torch.eye(len(h_a)),) * 2
    g_a, g_b = g_a.double(), g_b.double()
    w_a, w_b = _union_weights(lin_a, widths, 0), _union_weights(lin_b, widths, 1)
    k = round(share * min(len(w_a), len(w_b)))
    cost, s_inv = merge_cost(g_a, g_b, w_a, w_b)
    pairs = _greedy_pairs(cost, k)
    ia = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    jb = torch.tensor([j for _, j in pairs], dtype=torch.long)
    ra = torch.tensor([i for i in range(len(w_a)) if i not in set(ia.tolist())], dtype=torch.long)
    rb = torch.tensor([j for j in range(len(w_b)) if j not in set(jb.tolist())], dtype=torch.long)
    shared, error = None, 0.0
    if k:
        merged = _merged(g_a, g_b, s_inv, w_a[ia], w_b[jb])
        da, db = merged - w_a[ia], merged - w_b[jb]
        error = 0.5 * float(((da @ h_a) * da).sum() + ((db @ h_b) * db).sum())
        merged = merged.float()
        shared = _linear(merged[:, :-1], merged[:, -1])
    only_a = _linear(lin_a.weight.detach()[ra], lin_a.bias.detach()[ra]) if len(ra) else None
    only_b = _linear(lin_b.weight.detach()[rb], lin_b.bias.detach()[rb]) if len(rb) else None
    activation = nn.Sequential(*copy.deepcopy(act_a))
    layer = ZipLayer(shared, only_a, only_b, activation)
    tail_a = nn.Sequential(_with_columns(rest_a[0], torch.cat([ia, ra])), *rest_a[1:])
    tail_b = nn.Sequential(_with_columns(rest_b[0], torch.cat([jb, rb])), *rest_b[1:])
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


def zip_models(model_a: nn.Module, model_b: nn.Module, data_a: Dataset, data_b: Dataset, *,
               share: float | Sequence[float], damping: float = 1e-3,
               retrain_epochs: int = 2, final_epochs: int = 5, lr: float = 1e-3,
               criterion: str = "hessian", seed: int = 0) -> ZipResult:
    """Zip two chain models that take the same input (MTZ, He, Zhou & Thiele 2018).

    ``share``: fraction of ``min(n_a, n_b)`` neurons merged in each hidden layer, one
    number for all or one per layer from the input side (later layers stay unzipped).
    After each layer both tasks re-train ``retrain_epochs`` epochs, and ``final_epochs``
    at the end. ``criterion="euclidean"`` replaces both Hessians by the identity (pairs
    by Euclidean distance, merged weights averaged): an ablation, to see what the Hessian
    buys. The input models are not modified.
    """
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
    x = example_input(data_a, 2)
    parts = []
    for model, which in ((model_a, "A"), (model_b, "B")):
        model = copy.deepcopy(model).eval()
        pre, body = _chain(model, which)
        _check_chain(model, pre, body, x, which)
        parts.append((pre, body))
    if [type(m) for m in parts[0][0]] != [type(m) for m in parts[1][0]]:
        raise UnsupportedLayerError("zip: the two models prepare their input differently")
    hidden = min(sum(isinstance(m, nn.Linear) for m in body) - 1 for _, body in parts)
    if isinstance(share, (int, float)):
        fractions = fractions * hidden
    if not 1 <= len(fractions) <= hidden:
        raise RecipeError(f"zip: share gives {len(fractions)} fraction(s) but the models have "
                          f"{hidden} hidden layer(s) in common to zip (output layers stay "
                          f"task-specific)")
    fractions = [float(f) for f in fractions]
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
