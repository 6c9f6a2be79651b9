"""The hashing trick for weight sharing (technique ``hashed_net``).

Chen, Wilson, Tyree, Weinberger & Chen (2015), "Compressing neural networks with the
hashing trick" (HashedNets): a layer's virtual weight matrix ``V[out, in]`` is never
stored; each entry is read from a small vector of ``buckets`` real parameters ``w``
through a hash ``h(i, j)`` and multiplied by a sign hash ``xi(i, j)`` in ``{-1, +1}``
(the paper's section 4.3, which removes the bias of colliding entries)::

    V[i, j] = xi(i, j) * w[h(i, j)]

Both hashes are a cheap integer mix of ``(i * in + j, seed)`` computed with torch ops
(no Python loop over elements). They are precomputed once per layer as non-persistent
buffers ``index`` (int64 ``[out, in]``) and ``sign`` (int8 ``[out, in]``), rebuilt from
``(shape, seed)``: the ``.nnc`` file stores only ``w`` (``hashed_weight``, ``[buckets]``)
and the bias. The gather gives ``w[k]`` the sum of the signed gradients of all entries hashed
into bucket ``k``: ``dL/dw_k = sum_{h(i,j)=k} xi(i, j) dL/dV_ij`` (the paper's eq. 12).

The technique replaces selected ``nn.Linear`` layers of a trained model by
:class:`HashedLinear` with ``buckets = round(in * out / compression)``, initialising
each bucket to the mean of the sign-corrected trained weights hashed into it, then
fine-tunes.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["HashedLinear", "HashedNetConfig", "hash_indices", "hashed_net", "to_hashed"]

Device = torch.device | str | None
Patterns = Annotated[tuple[str, ...], Field(strict=False)]

_M32 = 0xFFFFFFFF
#: the most virtual entries (``in * out``) a hashed layer may have: its index and sign
#: buffers take 9 bytes per entry, and a file's args must not make ``load`` allocate more.
MAX_VIRTUAL = 2**28


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche mix of int64 values in ``[0, 2**32)`` (murmur3-style finaliser with
    multipliers below ``2**31``, so no product leaves int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def hash_indices(out_features: int, in_features: int, buckets: int, seed: int,
                 device: Device = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, sign)`` for a ``[out, in]`` virtual matrix: ``index`` int64 in
    ``[0, buckets)`` and ``sign`` int8 in ``{-1, +1}``, deterministic in the arguments."""
    key = torch.arange(out_features * in_features, dtype=torch.int64, device=device)
    key = (key ^ (key >> 32)) & _M32
    salt_h = (seed * 0x9E3779B1 + 0x85EBCA6B) & _M32
    salt_s = (seed * 0x9E3779B1 + 0xC2B2AE35) & _M32
    index = _mix32(key ^ salt_h) % buckets
    sign = (1 - 2 * (_mix32(key ^ salt_s) & 1)).to(torch.int8)
    shape = (out_features, in_features)
    return index.reshape(shape), sign.reshape(shape)


class HashedLinear(nn.Linear):
    """``x[..., in] -> x @ V.T + bias -> [..., out]`` with ``V[i, j] = sign[i, j] *
    hashed_weight[index[i, j]]``; ``hashed_weight``: ``[buckets]``, ``bias``: ``[out]``.

    An ``nn.Linear`` subclass so code that reads Linear widths (the reference models'
    ``arch_config``) keeps working. ``weight`` is a read-only property giving the virtual
    ``V [out, in]`` (so MAC counting sees the real ``in * out`` multiply-accumulates); the
    only weight parameter is ``hashed_weight``, which no Linear rule (pruning, SVD) touches.
    """

    def __init__(self, in_features: int, out_features: int, buckets: int, seed: int = 0,
                 bias: bool = True, device: Device = None) -> None:
        nn.Module.__init__(self)
        if min(in_features, out_features, buckets) < 1:
            raise ValueError(f"HashedLinear needs positive sizes, got in_features="
                             f"{in_features}, out_features={out_features}, buckets={buckets}")
        if in_features * out_features > MAX_VIRTUAL:
            raise ValueError(f"HashedLinear of {in_features} x {out_features} exceeds "
                             f"{MAX_VIRTUAL} virtual weights")
        self.in_features, self.out_features = in_features, out_features
        self.buckets, self.seed = buckets, seed
        self.hashed_weight = nn.Parameter(torch.empty(buckets, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        index, sign = hash_indices(out_features, in_features, buckets, seed, device=device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The usual Linear init bounds (``1/sqrt(in)``) for the buckets and the bias."""
        if "index" not in self._buffers:  # nn.Linear internals may call this early
            return
        bound = 1.0 / max(1, self.in_features) ** 0.5
        nn.init.uniform_(self.hashed_weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def virtual_weight(self) -> torch.Tensor:
        """``V [out, in] = sign * hashed_weight[index]``, differentiable in ``hashed_weight``."""
        return self.hashed_weight[self.index] * self.sign.to(self.hashed_weight.dtype)

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:  # read-only: the buckets are the parameter
        return self.virtual_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"buckets={self.buckets}, seed={self.seed}, bias={self.bias is not None}")


def to_hashed(linear: nn.Linear, buckets: int, seed: int) -> HashedLinear:
    """A :class:`HashedLinear` whose bucket ``k`` is the mean of ``sign * W`` over the
    entries hashed into ``k`` (0 for an empty bucket); the bias is copied."""
    w = linear.weight.detach()
    new = HashedLinear(linear.in_features, linear.out_features, buckets, seed,
                       bias=linear.bias is not None, device=w.device).to(w.dtype)
    flat = new.index.reshape(-1)
    signed = (w * new.sign.to(w.dtype)).reshape(-1)
    sums = torch.zeros(buckets, dtype=w.dtype, device=w.device).index_add_(0, flat, signed)
    counts = torch.bincount(flat, minlength=buckets).to(w.dtype)
    with torch.no_grad():
        new.hashed_weight.copy_(sums / counts.clamp(min=1))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    return new


class HashedNetConfig(TechniqueConfig):
    """Parameters of ``hashed_net``.

    - ``compression``: virtual weights per stored bucket (``buckets = round(in * out /
      compression)``, at least 1); the paper reports 8x and 64x.
    - ``layers`` / ``exclude``: fnmatch patterns over module names. Only exact
      ``nn.Linear`` layers are hashed; a wildcard that also matches other layers skips
      them (noted), a pattern without wildcards naming another layer type is an error.
    - ``epochs`` / ``lr``: fine-tuning after hashing (0: none).
    - ``seed``: hash seed of the first hashed layer (the next ones get ``seed + 1``, ...);
      default: the run's seed.
    """

    compression: float = Field(default=8.0, ge=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    epochs: int = Field(default=3, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)


def _explicit(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def _selected(model: nn.Module, config: HashedNetConfig, ctx: Context) -> list[str]:
    """Names of the Linear layers to hash; refuses other types that a pattern names."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for pattern in config.layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ModelError(f"hashed_net: layers pattern {pattern!r} matches no module")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.layers)
              and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
    out = []
    for name in chosen:
        module = modules[name]
        if type(module) is nn.Linear:
            out.append(name)
            continue
        if name in config.layers and _explicit(name):
            raise UnsupportedLayerError(f"hashed_net: cannot hash {name!r} "
                                        f"({type(module).__name__}); only nn.Linear")
        if any(True for _ in module.parameters(recurse=False)):
            ctx.note(f"hashed_net: not hashed, not an nn.Linear: {name} "
                     f"({type(module).__name__})")
    if not out:
        raise UnsupportedLayerError(f"hashed_net: the patterns {list(config.layers)} select "
                                    f"no nn.Linear layer in {type(model).__name__}")
    return out


def hashed_net(model: nn.Module, config: HashedNetConfig, ctx: Context) -> nn.Module:
    """Replace the selected Linear layers of ``model`` in place by :class:`HashedLinear`
    (Chen et al., 2015), then fine-tune ``epochs`` at ``lr``; drops their weight masks."""
    base = ctx.seed if config.seed is None else config.seed
    for offset, name in enumerate(_selected(model, config, ctx)):
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear)
        virtual = old.in_features * old.out_features
        buckets = max(1, round(virtual / config.compression))
        new = to_hashed(old, buckets, base + offset)
        model.set_submodule(name, new)
        if ctx.masks.pop(f"{name}.weight", None) is not None:
            ctx.note(f"hashed_net: dropped the pruning mask of {name}.weight")
        ctx.note(f"hashed_net: {name}: {virtual} weights -> {buckets} buckets")
    if config.epochs > 0:
        ctx.fine_tune(model, epochs=config.epochs, lr=config.lr, desc="hashed-net fine-tune")
    return model


TECHNIQUES.register("hashed_net", Technique(
    name="hashed_net",
    category="sparse-representation",
    paper="Chen, Wilson, Tyree, Weinberger & Chen (2015): Compressing neural networks with "
          "the hashing trick",
    summary="HashedNets: each selected Linear's weight matrix becomes a virtual one read "
            "through a hash (with a sign hash) from in*out/compression shared parameters, "
            "initialised from the trained weights, then fine-tuned.",
    config=HashedNetConfig,
    apply=hashed_net,
))
