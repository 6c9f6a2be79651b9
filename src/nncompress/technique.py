"""What a compression technique is, and the context one ``compress`` run hands it.

A technique (design principle 1) is a validated, frozen config class plus one function
``apply(model, config, ctx) -> model``. Techniques register themselves in
:data:`TECHNIQUES` when their package is imported; :func:`all_techniques` imports every
technique package so the registry is complete.

Categories follow the survey's families of compression methods: pruning, sparse
representation, bits precision, knowledge distillation and miscellaneous.
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
    from nncompress.train import TrainLog

__all__ = [
    "CATEGORIES",
    "TECHNIQUES",
    "Context",
    "Technique",
    "TechniqueConfig",
    "all_techniques",
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
                                        "nncompress.quant", "nncompress.share")


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
    """

    data: Dataset
    seed: int = 0
    progress: bool = True
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

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
                               lr_schedule=lr_schedule)


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
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"technique name must be a non-empty string, got {self.name!r}")
        if self.category not in CATEGORIES:
            raise ValueError(f"technique {self.name!r}: category {self.category!r} is not "
                             f"one of {', '.join(CATEGORIES)}")
        if not (isinstance(self.config, type) and issubclass(self.config, BaseModel)):
            raise TypeError(f"technique {self.name!r}: config must be a pydantic model class")
        cfg = self.config.model_config
        if not cfg.get("frozen") or cfg.get("extra") != "forbid":
            raise TypeError(f"technique {self.name!r}: config must set frozen=True and "
                            "extra='forbid'")
        if not callable(self.apply):
            raise TypeError(f"technique {self.name!r}: apply must be callable")


#: technique name -> Technique; filled when the technique packages are imported.
TECHNIQUES: Registry[Technique] = Registry("technique", error=RecipeError)


def all_techniques() -> Registry[Technique]:
    """Import every technique package (registering its techniques); return the registry."""
    for package in TECHNIQUE_PACKAGES:
        importlib.import_module(package)
    return TECHNIQUES
