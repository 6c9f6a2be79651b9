"""``low_rank``: truncated-SVD factorisation of fully connected, convolutional and recurrent
weights, with the rank chosen by the energy kept, by a rank ratio, or to hit a parameter
reduction target.

- Linear ``W[out, in] ~ U[out, r] V[r, in]`` (Xue, Li & Gong, 2013, "Restructuring of deep
  neural network acoustic models with singular value decomposition") becomes
  ``Linear(in -> r, no bias)`` then ``Linear(r -> out)`` (:class:`LowRankLinear`), only
  where ``r * (in + out) < in * out``.
- Conv1d/Conv2d (groups=1): Denton, Zaremba, Bruna, LeCun & Fergus (2014), "Exploiting
  linear structure within convolutional networks for efficient evaluation": the SVD of
  ``W[out, in * k]`` gives a Conv(in -> r, kernel k) and a pointwise Conv(r -> out).
- GRU/LSTM/RNN input-to-hidden ``W_ih[G*H, in] ~ U V``: ``Linear(in -> r)`` on the
  sequence, then the native recurrent kernel with ``input_size = r`` (:class:`LowRankRNN`).
- LSTM hidden-to-hidden ``W_hh[4H, H]`` (``recurrent="projection"``): the LSTM with a
  recurrent projection layer (Sak, Senior & Beaufays, 2014, LSTMP), which torch runs
  natively: ``h' = W_hr m`` with ``W_hr = V[r, H]`` from the joint SVD of every matrix that
  reads the cell output ``m`` — ``W_hh`` and the next layer's ``W_ih`` (or the classifier)
  — so ``[W_hh; W_next] ~ [U_hh; U_next] V``. A GRU's ``W_hh`` is kept dense: its hidden
  state is also its output, so a factorised recurrence needs a per-step Python loop, which
  is slower than the fused native kernel (the point of factorising is speed).

Singular values ``s`` sorted descending; energy kept by rank r = ``sum(s[:r]**2) / sum(s**2)``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.lowrank.layers import (
    RNN_MODES,
    LowRankConv1d,
    LowRankConv2d,
    LowRankLinear,
    LowRankRNN,
)
from nncompress.prune.structured import drop_stale_masks, rewrite_builtins
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["LowRankConfig", "factorise", "low_rank", "svd_rank", "truncated_svd"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
RankRule = Callable[[torch.Tensor], int]
_FACTORISED = (LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankRNN)


class LowRankConfig(TechniqueConfig):
    """Parameters of ``low_rank``; set exactly one of ``energy``, ``rank_ratio``,
    ``params_reduction``.

    - ``energy``: per matrix, the smallest rank keeping this fraction of ``sum(s**2)``.
    - ``rank_ratio``: per matrix ``W[m, n]``, rank ``max(1, round(rank_ratio * min(m, n)))``.
    - ``params_reduction``: the largest single ``rank_ratio`` for which the whole model has
      at most ``1 / params_reduction`` of its parameters (e.g. 2.0: half).
    - ``recurrent``: ``"input"`` factorises only input-to-hidden matrices, so LSTMs keep
      torch's fused oneDNN kernel; ``"projection"`` also factorises LSTM recurrences
      (LSTMP): far fewer parameters, but torch runs a projected LSTM without oneDNN, which
      measured slower on CPU (see ``recipes/low-rank.yaml``).
    - ``layers`` / ``exclude``: fnmatch patterns over module names.
    - ``min_params``: matrices with fewer elements are left alone.
    - ``epochs`` / ``lr``: fine-tuning after factorising (0 epochs: none).
    """

    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    rank_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    params_reduction: float | None = Field(default=None, gt=1.0, le=1000.0)
    recurrent: Literal["input", "projection"] = "input"
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    min_params: int = Field(default=1024, ge=0)
    epochs: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_target(self) -> LowRankConfig:
        given = [k for k in ("energy", "rank_ratio", "params_reduction")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of energy, rank_ratio, params_reduction; "
                             f"got {', '.join(given) or 'none'}")
        return self


def svd_rank(s: torch.Tensor, *, energy: float | None = None,
             ratio: float | None = None) -> int:
    """Rank for singular values ``s`` (descending) by energy kept or by ratio of ``len(s)``."""
    if energy is not None:
        power = s.double() ** 2
        kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)
        return min(len(s), int(torch.searchsorted(kept, torch.tensor(energy - 1e-12,
                                                                     dtype=kept.dtype))) + 1)
    if ratio is not None:
        return max(1, min(len(s), round(ratio * len(s))))
    raise ValueError("svd_rank needs energy or ratio")


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[m, n] ~ a[m, rank] @ b[rank, n]``, the singular values split evenly (sqrt each)."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(w.dtype), (root[:, None] * vh[:rank]).to(w.dtype)


def _singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


def _copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def _factor_linear(m: nn.Linear, rule: RankRule, min_params: int) -> tuple[nn.Module, int] | None:
    w = m.weight
    out, inp = w.shape
    rank = rule(_singular_values(w))
    if w.numel() < min_params or rank * (inp + out) >= inp * out:
        return None
    new = LowRankLinear(inp, out, rank, bias=m.bias is not None, device=w.device)
    a, b = truncated_svd(w, rank)
    _copy_(new.weight, a)
    _copy_(new.first.weight, b)
    if m.bias is not None:
        _copy_(new.bias, m.bias)
    return new, rank


def _factor_conv(m: nn.Conv1d | nn.Conv2d, rule: RankRule,
                 min_params: int) -> tuple[nn.Module, int] | None:
    w = m.weight  # [out, in, *k]
    out, inp = w.shape[0], w.shape[1:].numel()
    flat = w.reshape(out, inp)
    rank = rule(_singular_values(flat))
    if w.numel() < min_params or rank * (inp + out) >= inp * out:
        return None
    cls = LowRankConv1d if isinstance(m, nn.Conv1d) else LowRankConv2d
    new = cls(m.in_channels, m.out_channels, rank, m.kernel_size, stride=m.stride,
              padding=m.padding, dilation=m.dilation, bias=m.bias is not None,
              padding_mode=m.padding_mode, device=w.device)
    a, b = truncated_svd(flat, rank)
    _copy_(new.weight, a.reshape(new.weight.shape))
    _copy_(new.first.weight, b.reshape(new.first.weight.shape))
    if m.bias is not None:
        _copy_(new.bias, m.bias)
    return new, rank


def _copy_rnn_(dst: nn.RNNBase, src: nn.RNNBase, skip: tuple[str, ...]) -> None:
    for name in src._flat_weights_names:
        if name not in skip:
            _copy_(getattr(dst, name), getattr(src, name))


def _factor_rnn(m: nn.RNNBase, rule: RankRule, min_params: int) -> tuple[nn.Module, int] | None:
    """W_ih of a single-layer unidirectional RNN -> proj (V) + native RNN with W_ih = U."""
    w = m.weight_ih_l0  # [G*H, in]
    gates, inp = w.shape
    rank = rule(_singular_values(w))
    if w.numel() < min_params or rank * (inp + gates) >= inp * gates:
        return None
    new = LowRankRNN(m.mode if m.mode in RNN_MODES else "RNN", inp, rank, m.hidden_size,
                     bias=m.bias, batch_first=m.batch_first,
                     proj_size=getattr(m, "proj_size", 0), device=w.device)
    if m.mode.startswith("RNN_"):  # nn.RNN: keep its nonlinearity
        new.rnn = nn.RNN(rank, m.hidden_size, bias=m.bias, batch_first=m.batch_first,
                         nonlinearity=m.nonlinearity, device=w.device)
    a, b = truncated_svd(w, rank)
    _copy_(new.proj.weight, b)
    _copy_(new.rnn.weight_ih_l0, a)
    _copy_rnn_(new.rnn, m, ("weight_ih_l0",))
    return new, rank


@dataclass(frozen=True)
class _Site:
    """Where a module sits: its parent and attribute name (for replacing it)."""

    parent: nn.Module
    leaf: str

    def set(self, module: nn.Module) -> None:
        setattr(self.parent, self.leaf, module)


def _sites(model: nn.Module) -> dict[str, _Site]:
    return {f"{p}.{n}" if p else n: _Site(m, n) for p, m in model.named_modules()
            for n, _ in m.named_children()}


def _plain_rnn(m: nn.Module) -> bool:
    return (isinstance(m, nn.RNNBase) and m.num_layers == 1 and not m.bidirectional
            and not getattr(m, "proj_size", 0))


def _rule(m: nn.Module) -> Callable[..., tuple[nn.Module, int] | None] | None:
    """The one table from layer type to its factorisation (None: not handled)."""
    # exact types: a subclass (attention's out_proj, a factorised layer) may rely on .weight
    if type(m) is nn.Linear:
        return _factor_linear
    if type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1:
        return _factor_conv
    if _plain_rnn(m):
        return _factor_rnn
    return None


def _unsupported(name: str, m: nn.Module) -> str | None:
    """``"name (Type ...)"`` for a module owning a weight matrix that no rule handles."""
    if _rule(m) is not None or isinstance(m, _FACTORISED):
        return None
    if not any(p.dim() >= 2 for p in m.parameters(recurse=False)):
        return None
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return f"{name} ({type(m).__name__} groups={m.groups})"
    own = [f"{name}.{p}" if name else p for p, t in m.named_parameters(recurse=False)
           if t.dim() >= 2]
    return f"{', '.join(own)} ({type(m).__name__})"


def _consumer(model: nn.Module, site: _Site) -> tuple[str, nn.Module] | None:
    """The layer reading an LSTM's output: the next plain RNN in its ModuleList/Sequential,
    or the model's ``classifier`` Linear after the last one (the reference layout)."""
    parent = site.parent
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or not site.leaf.isdigit():
        return None
    index = int(site.leaf)
    if index + 1 < len(parent):
        nxt = parent[index + 1]
        return (str(index + 1), nxt) if _plain_rnn(nxt) else None
    head = getattr(model, "classifier", None)
    return ("classifier", head) if type(head) is nn.Linear else None


def _project_lstm(lstm: nn.LSTM, reader: nn.Module, rule: RankRule, min_params: int
                  ) -> tuple[nn.LSTM, nn.Module, int] | None:
    """LSTMP from the joint SVD ``[W_hh; W_reader] ~ U V``: W_hr = V, W_hh' / W_reader' = U."""
    w_hh = lstm.weight_hh_l0  # [4H, H]
    w_rd = reader.weight_ih_l0 if isinstance(reader, nn.RNNBase) else reader.weight  # [*, H]
    stacked = torch.cat([w_hh, w_rd]).detach().double()
    (rows, hidden), rank = stacked.shape, rule(_singular_values(stacked))
    if w_hh.numel() < min_params or rank >= hidden or rank * (rows + hidden) >= rows * hidden:
        return None
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    us = (u[:, :rank] * s[:rank]).to(w_hh.dtype)
    new = nn.LSTM(lstm.input_size, hidden, bias=lstm.bias, batch_first=lstm.batch_first,
                  proj_size=rank, device=w_hh.device)
    _copy_rnn_(new, lstm, ("weight_hh_l0",))
    _copy_(new.weight_hh_l0, us[:len(w_hh)])
    _copy_(new.weight_hr_l0, vh[:rank].to(w_hh.dtype))
    if isinstance(reader, nn.RNNBase):
        extra = {"nonlinearity": reader.nonlinearity} if isinstance(reader, nn.RNN) else {}
        out: nn.Module = type(reader)(rank, reader.hidden_size, bias=reader.bias,
                                      batch_first=reader.batch_first, device=w_hh.device,
                                      **extra)
        _copy_rnn_(out, reader, ("weight_ih_l0",))
        _copy_(out.weight_ih_l0, us[len(w_hh):])
    else:
        out = nn.Linear(rank, reader.out_features, bias=reader.bias is not None,
                        device=w_hh.device)
        _copy_(out.weight, us[len(w_hh):])
        if reader.bias is not None:
            _copy_(out.bias, reader.bias)
    return new, out, rank


def _selected(model: nn.Module, layers: tuple[str, ...], exclude: tuple[str, ...]
              ) -> list[str]:
    modules = dict(model.named_modules())
    names = [n for n in modules if n
             and not isinstance(modules[n.rpartition(".")[0]], _FACTORISED)]  # its factors
    for pattern in layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ModelError(f"layers pattern {pattern!r} matches no module; modules: "
                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in layers)
            and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def factorise(model: nn.Module, rule: RankRule, *, recurrent: str = "input",
              layers: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = (),
              min_params: int = 1024) -> tuple[nn.Module, list[str]]:
    """Replace every selected layer by its truncated-SVD factorisation, in place.

    ``rule(s)`` picks a rank from a matrix's singular values. Returns the model and one
    log line per factorised layer, then one naming the selected layers with a weight matrix
    that no rule handles (grouped convs, embeddings, parameters on the model itself, GRU
    recurrences). Raises :class:`UnsupportedLayerError` if everything selected is such.
    """
    chosen = _selected(model, layers, exclude)
    modules = dict(model.named_modules())
    lines: list[str] = []
    unsupported = [u for n in ("", *chosen) if (u := _unsupported(n, modules[n]))]
    if not any(_rule(modules[n]) for n in chosen):
        raise UnsupportedLayerError(f"low_rank: no selected layer can be factorised (factorised "
                                    f"ones are skipped); "
                                    f"unsupported: {', '.join(unsupported) or 'none'}")
    if recurrent == "projection":
        for name in chosen:
            lines += _project_one(model, name, rule, min_params)
    modules, sites = dict(model.named_modules()), _sites(model)
    for name in chosen:
        module = modules.get(name)
        handler = _rule(module) if module is not None else None
        done = handler(module, rule, min_params) if handler else None
        if done is not None:
            sites[name].set(done[0])
            lines.append(f"low_rank: {name} ({type(module).__name__}) -> rank {done[1]}: "
                         f"{_params(module)} -> {_params(done[0])} params")
    dense = [n for n, m in model.named_modules() if isinstance(m, (nn.GRU, nn.RNN))
             and (n in chosen or n.rpartition(".")[0] in chosen)]
    if dense:
        lines.append(f"low_rank: GRU/RNN hidden-to-hidden W_hh kept dense (no native low-rank "
                     f"kernel; a Python-loop cell is slower): {', '.join(dense)}")
    if unsupported:
        lines.append(f"low_rank: not factorised, no rule for: {', '.join(unsupported)}")
    return model, lines


def _project_one(model: nn.Module, name: str, rule: RankRule, min_params: int) -> list[str]:
    lstm = dict(model.named_modules()).get(name)
    if not (isinstance(lstm, nn.LSTM) and _plain_rnn(lstm)):
        return []
    site = _sites(model)[name]
    found = _consumer(model, site)
    if found is None:
        return [f"low_rank: {name} LSTM recurrence kept dense: no known reader of its output"]
    leaf, reader = found
    done = _project_lstm(lstm, reader, rule, min_params)
    if done is None:
        return []
    new, new_reader, rank = done
    before = _params(lstm) + _params(reader)
    site.set(new)
    if leaf == "classifier":
        model.classifier = new_reader
    else:
        site.parent[int(leaf)] = new_reader
    return [f"low_rank: {name} LSTM recurrence -> projection rank {rank} (LSTMP, with its "
            f"reader): {before} -> {_params(new) + _params(new_reader)} params"]


def _rank_rule(energy: float | None, ratio: float | None) -> RankRule:
    return lambda s: svd_rank(s, energy=energy, ratio=ratio)


def _ratio_for(model: nn.Module, config: LowRankConfig) -> float:
    """Largest rank ratio (bisection, 12 steps) leaving <= 1/params_reduction of the params."""
    assert config.params_reduction is not None
    budget = _params(model) / config.params_reduction

    def size(ratio: float) -> int:
        trial, _ = factorise(copy.deepcopy(model), _rank_rule(None, ratio),
                             recurrent=config.recurrent, layers=config.layers,
                             exclude=config.exclude, min_params=config.min_params)
        return _params(trial)

    lo, hi = 1.0 / 1024, 1.0
    smallest = size(lo)
    if smallest > budget:
        raise ConstraintError(
            f"params_reduction {config.params_reduction} is out of reach: rank 1 everywhere "
            f"leaves {smallest} of {_params(model)} params "
            f"({_params(model) / smallest:.2f}x fewer; GRU recurrences stay dense, LSTM ones "
            f"only with recurrent='projection')")
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return lo


def low_rank(model: nn.Module, config: LowRankConfig, ctx: Context) -> nn.Module:
    """Factorise ``model`` in place (see the module docstring), then fine-tune. Built-ins
    whose forward reads their weights directly (``nn.TransformerEncoderLayer``'s fast path
    reads ``linear1.weight``) are rewritten first (:func:`nncompress.modules.decompose`)."""
    model = rewrite_builtins(model, ctx.masks, ctx.note, "low_rank")
    ratio = config.rank_ratio
    if config.params_reduction is not None:
        ratio = _ratio_for(model, config)
        ctx.note(f"low_rank: rank_ratio {ratio:.4f} meets params_reduction "
                 f"{config.params_reduction}")
    before = _params(model)
    model, lines = factorise(model, _rank_rule(config.energy, ratio),
                             recurrent=config.recurrent, layers=config.layers,
                             exclude=config.exclude, min_params=config.min_params)
    for line in lines:
        ctx.note(line)
    stale = drop_stale_masks(model, ctx.masks)
    if stale:
        ctx.note(f"low_rank: dropped the pruning masks of factorised weights: {', '.join(stale)}")
    ctx.note(f"low_rank: {before} -> {_params(model)} params")
    if config.epochs > 0:
        ctx.fine_tune(model, epochs=config.epochs, lr=config.lr, desc="low-rank fine-tune")
    return model


TECHNIQUES.register("low_rank", Technique(
    name="low_rank",
    category="pruning",
    paper="Denton, Zaremba, Bruna, LeCun & Fergus (2014): Exploiting linear structure within "
          "convolutional networks for efficient evaluation; Xue, Li & Gong (2013): "
          "Restructuring of deep neural network acoustic models with singular value "
          "decomposition; Sak, Senior & Beaufays (2014): LSTM recurrent neural network "
          "architectures for large scale acoustic modeling (LSTMP)",
    summary="Truncated-SVD factorisation of Linear, Conv (groups=1) and GRU/LSTM input "
            "weights, and of LSTM recurrences as a projection, with the rank chosen by "
            "energy, ratio or a parameter target; then fine-tune.",
    config=LowRankConfig,
    apply=low_rank,
))
