"""Distillation losses: plain ``nn.Module`` s, ``loss(student_out, teacher_out, labels=None)``.

Every loss returns a scalar tensor; ``labels`` is None for unlabelled data. The teacher's
outputs are targets: every loss detaches them (no gradient reaches the teacher).

- :class:`KDLoss` -- Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural
  network": ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.
- :class:`CosineLoss`, :class:`MSELoss` -- output matching for embedding / regression models.
- :class:`AngularLoss` -- the angular distillation loss of ShrinkTeaNet (Duong, Luu, Quach &
  Le, 2019): squared distance of L2-normalised embeddings, ``2 * (1 - cos)``.
- :class:`CSKDLoss` + :class:`ClassPairs` -- class-wise self-knowledge distillation (Yun,
  Park, Lee & Shin, 2020).
- :class:`NoisyTeacher` -- RONA's bounded, perturbed teacher (Wang, Bao, Sun, Zhu, Cao & Yu,
  2019, "Private model compression via knowledge distillation").
- :class:`MMDLoss`, :class:`CORALLoss` -- domain alignment between two feature batches
  (Gretton et al. 2012 / Long et al. 2015 multi-kernel MMD; Sun & Saenko 2016 Deep CORAL),
  the alignment term of the MobileDA trainer (Yang et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncompress import inputs
from nncompress.errors import DataError, ModelError, RecipeError
from nncompress.inputs import Inputs

__all__ = ["AngularLoss", "CORALLoss", "CSKDLoss", "ClassPairs", "CosineLoss", "KDLoss",
           "MMDLoss", "MSELoss", "NoisyTeacher"]


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise RecipeError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _tensor(out: Any, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{who} outputs must be a tensor for distillation, got "
                         f"{type(out).__name__}")
    return out


def _pair(student_out: Any, teacher_out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The two outputs as tensors of one shape with a batch dimension; the teacher's
    detached."""
    s, t = _tensor(student_out, "student"), _tensor(teacher_out, "teacher")
    if s.shape != t.shape or s.dim() < 1:
        raise ModelError(f"student outputs {list(s.shape)} and teacher outputs "
                         f"{list(t.shape)} differ in shape")
    return s, t.detach().to(s.dtype)


def _rows(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, ..., C]`` as rows ``[B*..., C]`` (classes last)."""
    if s.dim() < 2:
        raise ModelError(f"logits need a class dimension: got shape {list(s.shape)}")
    return s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])


def _labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels ``logits.shape[:-1]`` as one int64 row per logit row."""
    if labels.shape != logits.shape[:-1]:
        raise DataError(f"labels of shape {list(labels.shape)} do not fit logits of shape "
                        f"{list(logits.shape)}")
    return labels.reshape(-1).long()


def soft_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over classes, mean over rows.

    ``s``, ``t``: ``[B, ..., C]`` logits (``t`` is not differentiated). The ``T^2`` keeps
    the soft gradients' magnitude independent of T (Hinton et al. 2015, sec. 2)."""
    s2, t2 = _rows(s, t.detach())
    kl = F.kl_div(F.log_softmax(s2 / temperature, dim=-1), F.log_softmax(t2 / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return temperature * temperature * kl


class KDLoss(nn.Module):
    """Logits distillation, Hinton, Vinyals & Dean (2015).

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, the KL
    summed over classes and averaged over samples ("batchmean"), CE at temperature 1.

    - ``student_out``, ``teacher_out``: logits ``[B, C]`` (or ``[B, ..., C]``: every
      position a row); ``labels``: int64 ``[B]`` (``[B, ...]``) or None.
    - ``labels=None`` (unlabelled data): the soft term alone, i.e. ``alpha`` is treated as
      1; ``alpha=0`` then has nothing to learn from and is a :class:`DataError`.
    - As ``T`` grows, ``T^2 * KL`` tends to ``sum((s - t)^2) / (2 C)`` per sample for
      zero-mean logits: the logit matching of Hinton et al. sec. 2.1.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = _positive("KDLoss temperature", temperature)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise RecipeError(f"KDLoss alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        s, t = _pair(student_out, teacher_out)
        if labels is None:
            if self.alpha == 0.0:
                raise DataError("KDLoss with alpha=0 needs labels")
            return soft_kl(s, t, self.temperature)
        y = _labels(labels, s)
        hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), y)
        if self.alpha == 0.0:
            return hard
        return self.alpha * soft_kl(s, t, self.temperature) + (1.0 - self.alpha) * hard

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


class CosineLoss(nn.Module):
    """``mean_b (1 - cos(s_b, t_b))``: outputs ``[B, ...]`` flattened per sample (embedding
    models). Ignores labels."""

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        s, t = _pair(student_out, teacher_out)
        cos = F.cosine_similarity(s.reshape(len(s), -1), t.reshape(len(t), -1), dim=1, eps=1e-8)
        return (1.0 - cos).mean()


class MSELoss(nn.Module):
    """Mean squared error to the teacher's outputs ``[B, ...]`` (mean over every element;
    regression models). Ignores labels."""

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        s, t = _pair(student_out, teacher_out)
        return F.mse_loss(s, t)


class AngularLoss(nn.Module):
    """Angular distillation loss of ShrinkTeaNet (Duong, Luu, Quach & Le, 2019).

    ``mean_b || s_b / ||s_b|| - t_b / ||t_b|| ||^2`` over features ``[B, ...]`` flattened
    per sample: the distance between the two embeddings' directions on the unit
    hypersphere, blind to their norms. It equals ``2 * (1 - cos(s_b, t_b))``, i.e. twice
    :class:`CosineLoss` (same minimiser, gradients twice as large). Ignores labels.
    """

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        s, t = _pair(student_out, teacher_out)
        s_hat = F.normalize(s.reshape(len(s), -1), dim=1, eps=1e-8)
        t_hat = F.normalize(t.reshape(len(t), -1), dim=1, eps=1e-8)
        return (s_hat - t_hat).pow(2).sum(dim=1).mean()


class CSKDLoss(nn.Module):
    """Class-wise self-knowledge distillation, Yun, Park, Lee & Shin (2020).

    ``CE(s, y) + weight * T^2 * KL(softmax(stopgrad(t)/T) || softmax(s/T))`` where ``s``
    (``student_out``, ``[B, C]``) are the model's logits on samples ``x`` and ``t``
    (``teacher_out``, ``[B, C]``) the *same* model's logits on ``x'``, another sample of the
    same class (:meth:`ClassPairs.partners`); ``t`` is detached. Needs labels ``[B]``.
    The paper's defaults: T = 4, weight (lambda_cls) = 1.
    """

    def __init__(self, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__()
        self.temperature = _positive("CSKDLoss temperature", temperature)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise RecipeError(f"CSKDLoss weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise DataError("CSKDLoss needs labels (class-wise pairs), got unlabelled data")
        s, t = _pair(student_out, teacher_out)
        hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), _labels(labels, s))
        return hard + self.weight * soft_kl(s, t, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}"


class ClassPairs:
    """For CS-KD: a pool of training samples by class, and for each sample of a batch
    another pool sample of its class, drawn by this object's seeded generator.

    ``x_train``: inputs ``[N, ...]`` (a tensor or tuple / dict of them), ``y_train``: int64
    ``[N]``. Draws are uniform over the class; given the batch's inputs, a draw that equals
    the sample itself is replaced by a uniform draw among the class's other samples
    (when the class has more than one).
    """

    def __init__(self, x_train: Inputs, y_train: torch.Tensor, seed: int = 0) -> None:
        self.x = inputs.check(x_train, "x_train")
        y = torch.as_tensor(y_train)
        if y.dim() != 1 or len(y) != inputs.batch_size(self.x) or y.is_floating_point():
            raise DataError(f"ClassPairs needs integer labels [N] for {inputs.batch_size(self.x)}"
                            f" samples, got {y.dtype} {list(y.shape)}")
        self.y = y.long()
        order = torch.argsort(self.y, stable=True)
        classes, counts = torch.unique_consecutive(self.y[order], return_counts=True)
        self._members = dict(zip(classes.tolist(), torch.split(order, counts.tolist()),
                                 strict=True))
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_data(cls, data: Any, seed: int = 0) -> ClassPairs:
        """The pool of a :class:`~nncompress.data.Dataset`'s training split (in order)."""
        from nncompress.data.split import tensors

        if not getattr(data, "labelled", True):
            raise DataError(f"CS-KD needs labelled data, but {data.name!r} has inputs only")
        x, y = tensors(data.train)
        return cls(x, y, seed)

    def partners(self, y: torch.Tensor, x: Inputs | None = None) -> Inputs:
        """Inputs of one pool sample of class ``y[i]`` for every ``i`` (same form as the
        pool); ``x``: the batch's own inputs, so that a sample is not its own partner."""
        picks = torch.empty(len(y), dtype=torch.long)
        own = None if x is None else inputs.leaves(x)
        for i, label in enumerate(y.tolist()):
            members = self._members.get(label)
            if members is None:
                raise DataError(f"class {label} has no sample in the CS-KD pool")
            n = len(members)
            k = int(torch.randint(n, (1,), generator=self._generator))
            if own is not None and n > 1 and self._same(members[k], own, i):
                r = int(torch.randint(n - 1, (1,), generator=self._generator))
                k = (k + 1 + r) % n
            picks[i] = members[k]
        return inputs.select(self.x, picks)

    def _same(self, index: torch.Tensor, own: list[torch.Tensor], i: int) -> bool:
        pool = inputs.leaves(self.x)
        return all(torch.equal(p[index].cpu(), o[i].cpu()) for p, o in zip(pool, own, strict=True))


class NoisyTeacher(nn.Module):
    """A teacher whose outputs are bounded and perturbed with Gaussian noise: the knowledge
    sanitiser of RONA (Wang, Bao, Sun, Zhu, Cao & Yu, 2019), which trains a compact student
    on public data from a teacher trained on sensitive data, with differential privacy.

    Per call, each sample's output (flattened, e.g. logits ``[C]``) is clipped to L2 norm at
    most ``B`` and noise ``N(0, (noise_scale * B)^2)`` is added to every element. This is
    the Gaussian mechanism: **the privacy parameter is ``noise_scale`` (sigma), the noise
    standard deviation in units of the bound B** on a sample's output norm (the noise
    multiplier; larger is more private). The ``(eps, delta)`` it buys depends on the number
    of queries, which RONA composes with the moments accountant (Abadi et al. 2016); that
    accounting is not done here. ``bound=None``: the adaptive
    bound, B = the median per-sample output norm of the call's batch (keeps most outputs
    unclipped; the bound then depends on the batch, so state a fixed ``bound`` for a formal
    DP claim). ``noise_scale=0``: clipping only.

    RONA's objective needs no loss of its own: hint learning (:class:`~nncompress.distill.
    features.FeatureDistiller` with ``perturb=noisy.perturb`` on the teacher's features) +
    distillation on these noisy outputs with :class:`KDLoss` (whose CE term is RONA's
    self-learning on the labelled public data). The noise is drawn from this module's own
    generator seeded with ``seed``: the same seed gives the same sequence of calls.
    """

    def __init__(self, teacher: nn.Module, noise_scale: float, seed: int = 0,
                 bound: float | None = None) -> None:
        super().__init__()
        if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale)
                and noise_scale >= 0):
            raise RecipeError(f"NoisyTeacher noise_scale must be a finite number >= 0, got "
                              f"{noise_scale!r}")
        self.teacher = teacher
        self.noise_scale = float(noise_scale)
        self.bound = None if bound is None else _positive("NoisyTeacher bound", bound)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the noise sequence (from ``seed``, or the constructor's)."""
        self.seed = self.seed if seed is None else int(seed)
        self._generator.manual_seed(self.seed)

    def perturb(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``[B, ...]`` (detached) with each sample clipped to norm B plus noise."""
        out = _tensor(out, "teacher").detach()
        flat = out.reshape(len(out), -1)
        norms = flat.norm(dim=1, keepdim=True)
        bound = self.bound if self.bound is not None else float(norms.median())
        if bound <= 0:
            return out
        clipped = flat * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
        noise = torch.randn(flat.shape, generator=self._generator, dtype=torch.float32)
        noisy = clipped + noise.to(flat.device, flat.dtype) * (self.noise_scale * bound)
        return noisy.reshape(out.shape)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            out = self.teacher(*args, **kwargs)
        return self.perturb(out)

    def extra_repr(self) -> str:
        return f"noise_scale={self.noise_scale}, bound={self.bound}, seed={self.seed}"


def _features(x: torch.Tensor, who: str) -> torch.Tensor:
    x = _tensor(x, who)
    if x.dim() < 2 or len(x) < 2:
        raise DataError(f"{who} features need at least 2 samples [N, D], got {list(x.shape)}")
    return x.reshape(len(x), -1)


def _pair_features(source: torch.Tensor, target: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = _features(source, "source"), _features(target, "target")
    if s.shape[1] != t.shape[1]:
        raise DataError(f"source features of width {s.shape[1]} and target features of width "
                        f"{t.shape[1]} differ")
    return s, t.to(s.dtype)


class MMDLoss(nn.Module):
    """Squared maximum mean discrepancy between two feature batches (Gretton et al. 2012),
    the biased (V-statistic) estimate ``mean k(s, s') + mean k(t, t') - 2 mean k(s, t)``.

    ``forward(source_feats [N, D], target_feats [M, D])`` (more dims are flattened per
    sample). ``kernel="gaussian"``: the mean of Gaussian kernels ``exp(-||a-b||^2 /
    (2 sigma_i^2))`` with ``sigma_i^2 = bandwidths[i] * m / 2``, ``m`` the mean squared
    distance between distinct samples of the pooled batch (detached): the multi-kernel
    MMD of Long et al. (2015, DAN). ``kernel="linear"``: ``||mean(s) - mean(t)||^2``.
    """

    def __init__(self, kernel: str = "gaussian",
                 bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> None:
        super().__init__()
        if kernel not in ("gaussian", "linear"):
            raise RecipeError(f"MMDLoss kernel must be 'gaussian' or 'linear', got {kernel!r}")
        if not bandwidths:
            raise RecipeError("MMDLoss needs at least one bandwidth")
        self.kernel = kernel
        self.bandwidths = tuple(_positive("MMDLoss bandwidth", b) for b in bandwidths)

    def forward(self, source_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
        s, t = _pair_features(source_feats, target_feats)
        if self.kernel == "linear":
            return (s.mean(0) - t.mean(0)).pow(2).sum()
        z = torch.cat([s, t])
        d2 = torch.cdist(z, z).pow(2)
        n = len(z)
        m = (d2.detach().sum() / (n * n - n)).clamp_min(1e-12)
        k = sum(torch.exp(-d2 / (b * m)) for b in self.bandwidths) / len(self.bandwidths)
        ns = len(s)
        return k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, bandwidths={self.bandwidths}"


class CORALLoss(nn.Module):
    """Deep CORAL (Sun & Saenko, 2016): ``||C_s - C_t||_F^2 / (4 D^2)``, ``C`` the unbiased
    feature covariances of ``source_feats [N, D]`` and ``target_feats [M, D]``."""

    def forward(self, source_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
        s, t = _pair_features(source_feats, target_feats)
        cs, ct = torch.cov(s.T), torch.cov(t.T)
        d = s.shape[1]
        return (cs - ct).pow(2).sum() / (4 * d * d)
