"""What a compression technique is, and the context one ``compress`` run hands it.

A technique (design principle 1) is a validated, frozen config class plus one function
``apply(model, config, ctx) -> model``. Techniques register themselves in
:data:`TECHNIQUES` when their package is imported; :func:`all_techniques` imports every
technique package so the registry is complete.

Categories follow the survey's families of compression methods: pruning, sparse
representation, bits precision, knowledge distillation and miscellaneous.

Methods that work on several models at once (multi-task zipping, multiplexing, a shared
backbone) are not recipe stages: they are :class:`MultiModelMethod` s in the second
registry :data:`MULTI_MODEL_METHODS` (filled by :mod:`nncompress.share.methods`), listed
by ``nncompress techniques`` after the single-model techniques and run by their own
subcommands (``nncompress zip``, ...). Naming one where a technique is expected gives a
RecipeError that says so (:func:`multi_model_hint`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from torch import nn

from nncompress.errors import RecipeError
from nncompress.registry import Registry

if TYPE_CHECKING:
    import torch

    from nncompress.data import Dataset
    from nncompress.train import Teacher, TrainLog

__all__ = [
    "CATEGORIES",
    "MULTI_MODEL_METHODS",
    "TECHNIQUES",
    "Context",
    "MultiModelMethod",
    "Technique",
    "TechniqueConfig",
    "all_multi_model_methods",
    "all_techniques",
    "multi_model_hint",
]

#: The survey's families of compression techniques; every technique names one.
CATEGORIES: tuple[str, ...] = (
    "pruning",
    "sparse-representation",
    "bits-precision",
    "knowledge-distillation",
    "miscellaneous",
)

#: Packages whose import registers techniques (one line per technique package).
TECHNIQUE_PACKAGES: tuple[str, ...] = ("nncompress.prune", "nncompress.lowrank",
                                        "nncompress.quant", "nncompress.share",
                                        "nncompress.distill")
#: Modules whose import registers multi-model methods.
MULTI_MODEL_PACKAGES: tuple[str, ...] = ("nncompress.share.methods",)


class TechniqueConfig(BaseModel):
    """Base class for technique configs: frozen, unknown keys rejected, no type coercion.

    Strict mode keeps ``"0.9"`` from passing as a float and ``true`` as an integer; an
    integer is still accepted where a float is expected.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


@dataclass
class Context:
    """Mutable state of one ``compress`` run; created per run and never shared.

    ``masks`` maps a parameter name (as in ``model.named_parameters()``) to a bool keep-mask
    of the parameter's shape; :meth:`fine_tune` zeroes the masked-out weights after every
    optimizer step, so pruned connections stay pruned (Han et al., 2015). A technique that
    changes a parameter's shape must update or drop its mask. ``log`` collects one-line
    notes for people (what was pruned, what was skipped and why).

    ``teacher``: what every stage that trains learns from -- by default (``teacher:
    original``) the uncompressed input model with a distillation loss; None trains on the
    labels' cross-entropy. ``metric``: the quality metric each training epoch reports (a
    name of :data:`nncompress.measure.METRICS`; None: accuracy, or top-1 agreement with the
    teacher for unlabelled data). Techniques that call :mod:`nncompress.train` themselves
    pass both on with :meth:`train_options`. ``original``: a frozen copy of the
    uncompressed input model (eval mode, no gradients) for post-training stages that match
    it (FSKD), whether or not the training stages distil.
    """

    data: Dataset
    seed: int = 0
    progress: bool = True
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    teacher: Teacher | None = None
    metric: str | None = None
    original: nn.Module | None = None

    def teacher_model(self, fallback: nn.Module) -> nn.Module:
        """The training teacher's model, or ``fallback`` (e.g. the model a stage received)
        when the run has none: what label-free scores compare with."""
        return self.teacher.model if self.teacher is not None else fallback

    def train_options(self) -> dict[str, Any]:
        """The keyword arguments every ``train.fit`` / ``train.fine_tune`` call of a stage
        passes on: the run's teacher and quality metric."""
        return {"teacher": self.teacher, "metric": self.metric}

    def note(self, message: str) -> None:
        """Append one line to the run's log."""
        self.log.append(" ".join(str(message).split()))

    def fine_tune(self, model: nn.Module, *, epochs: int, lr: float,
                  desc: str = "fine-tune", lr_schedule: str = "constant") -> TrainLog:
        """Fine-tune ``model`` in place with ``train.fine_tune``, keeping every mask applied.

        The masks are applied once before training and again after every optimizer step.
        """
        from nncompress import train
        from nncompress.prune.masks import apply_masks

        masks = self.masks
        if masks:
            apply_masks(model, masks)

        def after_step(m: nn.Module) -> None:
            apply_masks(m, masks)

        return train.fine_tune(model, self.data, epochs=epochs, lr=lr, seed=self.seed,
                               progress=self.progress, desc=desc,
                               after_step=after_step if masks else None,
                               lr_schedule=lr_schedule, **self.train_options())


Apply = Callable[[nn.Module, Any, Context], nn.Module]


@dataclass(frozen=True)
class Technique:
    """One compression technique: a name, where it comes from, its config and its function.

    ``paper`` names the source, e.g. ``"Han, Pool, Tran & Dally (2015): Learning both
    weights and connections for efficient neural networks"``. ``config`` is a
    :class:`pydantic.BaseModel` subclass that is frozen and forbids unknown keys (use
    :class:`TechniqueConfig` as its base). ``apply(model, config, ctx)`` returns the
    compressed model (it may modify ``model`` in place and return it).
    """

    name: str
    category: str
    paper: str
    summary: str
    config: type[BaseModel]
    apply: Apply

    def __post_init__(self) -> None:
        _check_record("technique", self.name, self.category, self.config,
                      ("apply", self.apply))


def _check_record(kind: str, name: object, category: str, config: object,
                  function: tuple[str, object]) -> None:
    """The checks a technique and a multi-model method share (``function``: its field name
    and value)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if category not in CATEGORIES:
        raise ValueError(f"{kind} {name!r}: category {category!r} is not "
                         f"one of {', '.join(CATEGORIES)}")
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise TypeError(f"{kind} {name!r}: config must be a pydantic model class")
    cfg = config.model_config
    if not cfg.get("frozen") or cfg.get("extra") != "forbid":
        raise TypeError(f"{kind} {name!r}: config must set frozen=True and extra='forbid'")
    if not callable(function[1]):
        raise TypeError(f"{kind} {name!r}: {function[0]} must be callable")


@dataclass(frozen=True)
class MultiModelMethod:
    """A method over several models at once (not a recipe stage): a name, where it comes
    from, what it takes, its config and its function.

    ``command`` is the ``nncompress`` subcommand that runs it; ``inputs`` says in a few
    words what it takes (e.g. "two models on one input, one task each"). ``config`` is a
    frozen pydantic model forbidding unknown keys (use :class:`TechniqueConfig`);
    ``run(inputs, config)`` returns the method's result (see
    :mod:`nncompress.share.methods` for the inputs and result types).
    """

    name: str
    command: str
    category: str
    paper: str
    summary: str
    inputs: str
    config: type[BaseModel]
    run: Callable[[Any, Any], Any]

    def __post_init__(self) -> None:
        _check_record("multi-model method", self.name, self.category, self.config,
                      ("run", self.run))
        if not self.command or not self.inputs:
            raise ValueError(f"multi-model method {self.name!r}: command and inputs must be "
                             "non-empty")


class _TechniqueRegistry(Registry[Technique]):
    """The technique registry; an unknown name that is a multi-model method says so."""

    def get(self, name: str) -> Technique:
        try:
            return super().get(name)
        except RecipeError as exc:
            hint = multi_model_hint(name) if isinstance(name, str) else None
            raise RecipeError(f"{exc}; {hint}" if hint else str(exc)) from None


#: technique name -> Technique; filled when the technique packages are imported.
TECHNIQUES: Registry[Technique] = _TechniqueRegistry("technique", error=RecipeError)
#: method name -> MultiModelMethod; filled when :data:`MULTI_MODEL_PACKAGES` are imported.
MULTI_MODEL_METHODS: Registry[MultiModelMethod] = Registry("multi-model method",
                                                           error=RecipeError)


def all_techniques() -> Registry[Technique]:
    """Import every technique package (registering its techniques); return the registry."""
    for package in TECHNIQUE_PACKAGES:
        importlib.import_module(package)
    return TECHNIQUES


def all_multi_model_methods() -> Registry[MultiModelMethod]:
    """Import the modules that register multi-model methods; return their registry."""
    for package in MULTI_MODEL_PACKAGES:
        importlib.import_module(package)
    return MULTI_MODEL_METHODS


def multi_model_hint(name: str) -> str | None:
    """For a multi-model method's name (or its subcommand's), one sentence saying that it is
    not a recipe stage and how to run it; ``None`` for any other name."""
    methods = all_multi_model_methods()
    method = next((methods.get(n) for n in methods.names()
                   if name in (n, methods.get(n).command)), None)
    if method is None:
        return None
    return (f"{name!r} is a multi-model method ({method.summary}; {method.inputs}), not a "
            f"recipe stage: run it with `nncompress {method.command}` (see `nncompress "
            f"{method.command} --help`)")
