"""Channel selection from a consumer layer's sampled inputs, and least-squares repair.

Both methods look at the layer that *consumes* a group of channels (the next Conv/Linear)
and decide which of its input channels to keep from samples of what it actually sees:

- He, Zhang & Sun (2017), "Channel pruning for accelerating very deep neural networks":
  LASSO regression picks the channels whose contributions best rebuild the consumer's
  original output, ``min ||Y - sum_c beta_c Z_c||^2 + lambda |beta|_1`` with lambda raised
  until at most ``keep`` coefficients survive; then the consumer's weights over the kept
  channels are refit by linear least squares against the original output ``Y``.
- Luo, Wu & Lin (2017), "ThiNet: a filter level pruning method for deep neural network
  compression": greedily remove the channel whose contribution to sampled output elements
  adds least to the squared sum of the removed set; then scale each kept channel by the
  least-squares factor that best restores the sampled outputs.

Shapes: a consumer's sampled input is ``X [N, C, K]`` -- N sampled output locations, C input
channels, K taps per channel (K = kernel size for a convolution, 1 for a Linear); its
weight viewed as ``W [O, C, K]``; its bias-free output ``Y = einsum("nck,ock->no", X, W)``.
Everything here is pure tensor maths; hooking into models is in ``prune/channel_select.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nncompress import inputs
from nncompress.errors import ConstraintError, UnsupportedLayerError

__all__ = [
    "consumer_weight",
    "lasso_select",
    "least_squares_weight",
    "output_of",
    "patches",
    "sample_inputs",
    "set_consumer_weight",
    "thinet_scales",
    "thinet_select",
]

RIDGE = 1e-6  # relative Tikhonov damping keeping the least-squares systems well posed


def consumer_weight(layer: nn.Module, unit_width: int = 1) -> torch.Tensor:
    """The consumer's weight as ``[O, C, K]`` (a copy, float32). For a Linear, each input
    unit spans ``unit_width`` consecutive columns (a flattened feature map's positions, an
    attention head's dimensions), which become its K taps."""
    w = layer.weight.detach().float()
    if isinstance(layer, nn.Linear):
        return w.reshape(w.shape[0], -1, unit_width).clone()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1:
        return w.reshape(w.shape[0], w.shape[1], -1).clone()
    raise UnsupportedLayerError(f"channel reconstruction supports Linear and ungrouped "
                                f"Conv1d/Conv2d consumers, not {type(layer).__name__}")


def set_consumer_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write ``w [O, C, K]`` back into the consumer's weight (whose shape already matches)."""
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))


def patches(layer: nn.Module, x: torch.Tensor, unit_width: int = 1) -> torch.Tensor:
    """The consumer's input ``x`` as per-output-location patches ``[B * L, C, K]``
    (``unit_width``: input columns per unit of a Linear, see :func:`consumer_weight`)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1] // unit_width, unit_width)
    if isinstance(layer, nn.Conv1d) and layer.groups == 1 and layer.padding_mode == "zeros":
        (k,), (s,), (p,), (d,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        if isinstance(layer.padding, str):
            raise UnsupportedLayerError("string padding is not supported for reconstruction")
        cols = F.unfold(x.unsqueeze(-1), (k, 1), dilation=(d, 1), padding=(p, 0), stride=(s, 1))
        return cols.reshape(x.shape[0], x.shape[1], k, -1).permute(0, 3, 1, 2).reshape(
            -1, x.shape[1], k)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros":
        if isinstance(layer.padding, str):
            raise UnsupportedLayerError("string padding is not supported for reconstruction")
        k = layer.kernel_size
        cols = F.unfold(x, k, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)
        taps = k[0] * k[1]
        return cols.reshape(x.shape[0], x.shape[1], taps, -1).permute(0, 3, 1, 2).reshape(
            -1, x.shape[1], taps)
    raise UnsupportedLayerError(f"channel reconstruction supports Linear and ungrouped "
                                f"zero-padded Conv1d/Conv2d consumers, not {layer!r}")


def sample_inputs(model: nn.Module, layer: nn.Module, batches: Iterable[inputs.Inputs], *,
                  samples: int, seed: int, unit_width: int = 1) -> torch.Tensor:
    """Run ``model`` on ``batches`` and sample ``samples`` rows of ``layer``'s input patches.

    Returns ``X [N, C, K]`` with N <= samples, drawn uniformly over all output locations
    seen (the paper samples a few locations per image; uniform sampling is the same in
    expectation).
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(patches(layer, args[0].detach().float(), unit_width))

    handle = layer.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                inputs.call(model, x)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ConstraintError("no samples reached the layer being reconstructed")
    rows = torch.cat(captured)
    gen = torch.Generator().manual_seed(seed)
    if len(rows) > samples:
        rows = rows[torch.randperm(len(rows), generator=gen)[:samples]]
    return rows


def output_of(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Bias-free consumer output ``Y [N, O]`` of inputs ``x [N, C, K]`` and ``w [O, C, K]``."""
    return torch.einsum("nck,ock->no", x, w)


def _check_keep(keep: int, channels: int) -> None:
    if not 1 <= keep <= channels:
        raise ConstraintError(f"cannot keep {keep} of {channels} channels (need 1..{channels})")


def lasso_select(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, keep: int) -> list[int]:
    """He et al. (2017) channel selection: ``keep`` channel indices (sorted).

    ``Z_c = X_c W_c^T`` is channel c's contribution to ``Y``; the LASSO over beta with
    lambda found by bisection keeps at most ``keep`` non-zero coefficients; ties and a
    short count are settled by ``|beta|`` then by the contribution's norm.
    """
    from sklearn.linear_model import Lasso

    channels = x.shape[1]
    _check_keep(keep, channels)
    z = torch.einsum("nck,ock->cno", x, w).reshape(channels, -1).T.double().numpy()
    target = y.reshape(-1).double().numpy()
    scale = float(np.abs(z.T @ target).max()) / len(target) or 1.0
    lo, hi = 0.0, scale  # at alpha >= max|Z^T y| / n every beta is zero
    beta = np.ones(channels)
    for _ in range(30):
        alpha = (lo + hi) / 2
        fit = Lasso(alpha=alpha, fit_intercept=False, max_iter=2000, tol=1e-4)
        fit.fit(z, target)
        count = int(np.count_nonzero(fit.coef_))
        if count > keep:
            lo = alpha
        else:
            hi, beta = alpha, fit.coef_.copy()
            if count == keep:
                break
    strength = np.linalg.norm(z, axis=0)
    order = sorted(range(channels), key=lambda c: (-abs(beta[c]), -strength[c]))
    return sorted(order[:keep])


def least_squares_weight(x: torch.Tensor, y: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Refit the consumer over ``kept`` channels: ``argmin_W' ||Y - X_kept W'||``.

    Returns ``W' [O, len(kept), K]`` (He et al., 2017, second step).
    """
    xs = x[:, kept, :].reshape(len(x), -1).double()  # [N, C'K]
    gram = xs.T @ xs
    damp = RIDGE * float(gram.diagonal().mean()) + 1e-12
    rhs = xs.T @ y.double()  # [C'K, O]
    sol = torch.linalg.solve(gram + damp * torch.eye(len(gram), dtype=gram.dtype), rhs)
    return sol.T.reshape(y.shape[1], len(kept), x.shape[2]).float()


def _contributions(x: torch.Tensor, w: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """ThiNet's ``x_hat [M, C]``: each channel's share of M sampled output elements."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(x), (samples,), generator=gen)
    outs = torch.randint(w.shape[0], (samples,), generator=gen)
    return torch.einsum("mck,mck->mc", x[rows], w[outs])


def thinet_select(x: torch.Tensor, w: torch.Tensor, keep: int, *, samples: int = 4096,
                  seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """Luo et al. (2017) greedy selection: returns (kept channel indices, ``x_hat``).

    Repeatedly removes the channel that keeps ``sum_m (sum_{c in removed} x_hat[m, c])^2``
    smallest, until ``C - keep`` channels are removed.
    """
    channels = x.shape[1]
    _check_keep(keep, channels)
    xhat = _contributions(x, w, samples, seed).double()
    removed: list[int] = []
    running = torch.zeros(len(xhat), dtype=xhat.dtype)
    left = set(range(channels))
    for _ in range(channels - keep):
        costs = {c: float(((running + xhat[:, c]) ** 2).sum()) for c in left}
        best = min(costs, key=lambda c: (costs[c], c))
        removed.append(best)
        left.remove(best)
        running += xhat[:, best]
    return sorted(left), xhat.float()


def thinet_scales(xhat: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """ThiNet's least-squares scaling ``w_hat = argmin ||y_hat - X_hat_kept w||`` per kept
    channel (``y_hat`` = the sampled elements of the unpruned output)."""
    target = xhat.double().sum(dim=1)
    a = xhat[:, kept].double()
    gram = a.T @ a
    damp = RIDGE * float(gram.diagonal().mean()) + 1e-12
    return torch.linalg.solve(gram + damp * torch.eye(len(kept), dtype=a.dtype),
                              a.T @ target).float()
