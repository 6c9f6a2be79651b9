"""Recipes: an ordered list of stages, read from YAML (or built in Python) and validated.

A stage is one of

- a technique: ``{technique: magnitude_prune, params: {sparsity: 0.9}}``;
- fine-tuning with the pruning masks kept: ``{fine_tune: {epochs: 2, lr: 0.0001}}``;
- a measurement checkpoint: ``{evaluate: {}}``.

Everything is checked when the recipe is loaded, before any work starts: unknown
techniques, stage keys or parameters, wrong types and out-of-range values raise a
:class:`~nncompress.errors.RecipeError` whose one-line message names the stage, the
technique and the bad value. YAML is read with a bounded ``yaml.SafeLoader`` only
(:mod:`nncompress._yaml`): configs are data, never code (design principle 7), and a
hostile recipe (over 1 MiB, deeper than 64 levels, more than 10,000 nodes or 100
aliases, a 100-digit integer, a FIFO or device instead of a file) is refused with a
one-line error naming the limit and, where known, the line and column.

Python::

    Recipe("mine", [Stage.technique("magnitude_prune", sparsity=0.9, scope="global"),
                    Stage.fine_tune(epochs=2, lr=1e-4), Stage.evaluate()])
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from nncompress._yaml import DEFAULT_LIMITS, describe_error, load_bounded, read_text_file
from nncompress.errors import RecipeError
from nncompress.technique import TechniqueConfig, all_techniques, multi_model_hint

__all__ = ["DistillConfig", "EvaluateConfig", "FineTuneConfig", "Recipe", "Stage"]

_RECIPE_KEYS = ("name", "description", "max_drop", "validation", "distill", "metric", "stages")
_STAGE_KINDS = ("technique", "fine_tune", "evaluate")


class FineTuneConfig(TechniqueConfig):
    """``fine_tune`` stage: ``epochs`` (>= 0) of masked fine-tuning at learning rate ``lr``,
    held ``constant`` or decayed to zero on a half ``cosine`` (``schedule``)."""

    epochs: int = Field(ge=0)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    schedule: Literal["constant", "cosine"] = "constant"


class DistillConfig(TechniqueConfig):
    """Recipe-level ``distill``: what every stage that trains (fine-tuning, QAT, centroid
    training, re-training after surgery) learns from.

    ``teacher``: ``original`` (the uncompressed input model) or ``none`` (cross-entropy on
    the labels). ``loss``: ``kd`` (Hinton, Vinyals & Dean 2015: ``alpha * T^2 *
    KL(soft) + (1 - alpha) * CE``, the CE term dropped on unlabelled data), ``cosine`` or
    ``mse`` to the teacher's outputs (for embedding or regression models), or ``auto``: the
    one that matches the quality metric (cosine for ``cosine``, mse for ``mse`` / ``r2``,
    kd otherwise).

    ``hints``: ``{student layer: teacher layer}`` whose features every training stage
    also matches (FitNets, Romero et al. 2015), through a trained adapter where the widths
    differ (a pruned layer); ``hint_loss`` ``mse`` or ``angular`` (ShrinkTeaNet, Duong et
    al. 2019), weighted ``hint_weight``. Names are checked before any stage runs.
    """

    teacher: Literal["original", "none"] = "original"
    loss: Literal["auto", "kd", "cosine", "mse"] = "auto"
    temperature: float = Field(default=4.0, gt=0.0, le=1000.0)
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    hints: dict[str, str] = Field(default_factory=dict)
    hint_loss: Literal["mse", "angular"] = "mse"
    hint_weight: float = Field(default=1.0, ge=0.0, le=1000.0)


class EvaluateConfig(TechniqueConfig):
    """``evaluate`` stage: no parameters; the model is measured."""


_BUILTIN: Mapping[str, type[BaseModel]] = MappingProxyType(
    {"fine_tune": FineTuneConfig, "evaluate": EvaluateConfig})


# ------------------------------------------------------------------ one-line errors


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _describe(error: Mapping[str, Any], config: type[BaseModel]) -> str:
    """One pydantic error entry as a short phrase naming the parameter and the bad value."""
    loc = error.get("loc") or ()
    name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                   for i, p in enumerate(loc))
    kind = error.get("type", "")
    got = _got(error.get("input"))
    if kind == "extra_forbidden":
        known = ", ".join(config.model_fields) or "none"
        close = difflib.get_close_matches(name, list(config.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown parameter {name!r}{hint}; known: {known}"
    if kind == "missing":
        return f"missing required parameter {name!r}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"parameter {name!r} must be {op} {_num(error.get('ctx', {}).get(key))} (got {got})"
    msg = str(error.get("msg", "is invalid"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    if not name:
        return msg
    return f"parameter {name!r} {msg} (got {got})"


def _validate(config: type[BaseModel], params: Mapping[str, Any], where: str) -> BaseModel:
    """Build ``config`` from ``params``; a ValidationError becomes a one-line RecipeError."""
    try:
        return config.model_validate(dict(params))
    except ValidationError as exc:
        # A misspelt name shows up as "unknown" and "missing": report the unknown one first.
        errors = sorted(exc.errors(include_url=False),
                        key=lambda e: {"extra_forbidden": 0, "missing": 2}.get(e["type"], 1))
        text = _describe(errors[0], config) if errors else "invalid parameters"
        if len(errors) > 1:
            more = len(errors) - 1
            text += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise RecipeError(f"{where}: {text}") from None


def _where(index: int | None, name: str | None) -> str:
    if index is None:
        return name or "recipe stage"
    return f"recipe stage {index}" + (f" ({name})" if name else "")


def _mapping(value: Any, where: str, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: {what} must be a mapping (got {type(value).__name__} "
                          f"{_got(value)})")
    return value


# ------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """One validated step of a recipe.

    ``kind`` is ``"technique"``, ``"fine_tune"`` or ``"evaluate"``; ``name`` is the technique
    name (or the kind for the other two); ``config`` the validated, frozen parameters.
    Build stages with :meth:`technique`, :meth:`fine_tune`, :meth:`evaluate` or
    :meth:`from_dict`.
    """

    kind: str
    name: str
    config: BaseModel

    def __post_init__(self) -> None:
        if self.kind not in _STAGE_KINDS:
            raise RecipeError(f"stage kind must be one of {', '.join(_STAGE_KINDS)} "
                              f"(got {_got(self.kind)})")
        if not isinstance(self.config, BaseModel):
            raise RecipeError(f"stage {self.name!r}: config must be a validated config "
                              f"object (got {type(self.config).__name__})")

    @classmethod
    def technique(cls, name: str, /, **params: Any) -> Stage:
        """A technique stage, e.g. ``Stage.technique("magnitude_prune", sparsity=0.9)``."""
        return cls._technique(name, params, None)

    @classmethod
    def fine_tune(cls, *, epochs: int, lr: float = 1e-4,
                  schedule: str = "constant") -> Stage:
        """Fine-tune for ``epochs`` at ``lr`` (``schedule``: constant or cosine), keeping
        pruned weights at zero."""
        return cls("fine_tune", "fine_tune",
                   _validate(FineTuneConfig, {"epochs": epochs, "lr": lr,
                                              "schedule": schedule}, "fine_tune"))

    @classmethod
    def evaluate(cls) -> Stage:
        """Measure the model here (accuracy, size, MACs, latency)."""
        return cls("evaluate", "evaluate", EvaluateConfig())

    @classmethod
    def _technique(cls, name: Any, params: Any, index: int | None) -> Stage:
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{_where(index, None)}: technique must be a name "
                              f"(got {_got(name)})")
        registry = all_techniques()
        if name not in registry:
            hint = multi_model_hint(name)
            if hint is not None:
                raise RecipeError(f"{_where(index, None)}: {hint}")
            known = ", ".join(registry.names()) or "none"
            raise RecipeError(f"{_where(index, None)}: unknown technique {name!r}; "
                              f"known: {known}")
        where = _where(index, name)
        config = registry.get(name).config
        return cls("technique", name, _validate(config, _mapping(params, where, "params"), where))

    @classmethod
    def from_dict(cls, data: Any, *, index: int | None = None) -> Stage:
        """Parse one stage mapping as written in YAML; ``index`` (1-based) goes in errors."""
        where = _where(index, None)
        if not isinstance(data, Mapping) or not data:
            raise RecipeError(f"{where}: a stage must be a mapping such as "
                              f"{{technique: NAME, params: {{...}}}}, {{fine_tune: {{epochs: N}}}} "
                              f"or {{evaluate: {{}}}} (got {_got(data)})")
        keys = [str(k) for k in data]
        if "technique" in data:
            extra = [k for k in keys if k not in ("technique", "params")]
            name = data["technique"]
            if extra:
                label = name if isinstance(name, str) else None
                raise RecipeError(f"{_where(index, label)}: unknown stage key {extra[0]!r}; "
                                  "a technique stage has keys technique, params")
            return cls._technique(name, data.get("params"), index)
        unknown = [k for k in keys if k not in _STAGE_KINDS]
        if unknown:
            raise RecipeError(f"{where}: unknown stage key {unknown[0]!r}; expected one of "
                              f"{', '.join(_STAGE_KINDS)}")
        if len(keys) > 1:
            raise RecipeError(f"{where}: one stage per list item; got keys "
                              f"{', '.join(repr(k) for k in keys)}")
        kind = keys[0]
        where = _where(index, kind)
        params = _mapping(data[kind], where, "parameters")
        return cls(kind, kind, _validate(_BUILTIN[kind], params, where))

    @property
    def params(self) -> dict[str, Any]:
        """The full parameter values (defaults included) as plain JSON/YAML data."""
        return self.config.model_dump(mode="json")

    def to_dict(self) -> dict[str, Any]:
        """The stage as written in YAML; ``Stage.from_dict(s.to_dict()) == s``."""
        if self.kind == "technique":
            return {"technique": self.name, "params": self.params}
        return {self.kind: self.params}


# ------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """A named, ordered, non-empty sequence of :class:`Stage` s (stored as a tuple).

    ``max_drop``: an accuracy budget in percentage points (e.g. 0.5): ``compress`` measures
    accuracy on a validation split carved from the training data (``validation``: its
    fraction of the training samples; the stages then train on the rest, and the test
    split is never looked at) and backs pruning and sharing stages off -- lower sparsity,
    more centroids -- until the drop from the uncompressed model is within it (see
    :mod:`nncompress.budget`). On unlabelled data the budget is in points of ``metric``
    (agreement, cosine or r2) against the uncompressed model. None: no budget.

    ``distill``: a :class:`DistillConfig` -- every stage that trains learns from a teacher
    (by default the uncompressed model); None: cross-entropy on the labels (on unlabelled
    data ``compress`` then distils from the original model anyway, and says so).
    ``metric``: the quality metric of the tables (a name of
    :data:`nncompress.measure.METRICS`; None: accuracy, or top-1 agreement with the
    original model for unlabelled data).
    """

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    max_drop: float | None = None
    validation: float = 0.15
    distill: DistillConfig | None = None
    metric: str | None = None

    PACKAGE: ClassVar[str] = "nncompress"
    FOLDER: ClassVar[str] = "recipes"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RecipeError(f"recipe name must be a non-empty string (got {_got(self.name)})")
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, Sequence):
            raise RecipeError(f"recipe {self.name!r}: stages must be a list of Stage "
                              f"(got {type(self.stages).__name__})")
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise RecipeError(f"recipe {self.name!r} has no stages")
        for i, stage in enumerate(self.stages, 1):
            if not isinstance(stage, Stage):
                raise RecipeError(f"recipe stage {i}: expected a Stage (got "
                                  f"{type(stage).__name__}); build one with Stage.technique, "
                                  "Stage.fine_tune or Stage.evaluate")
        if not isinstance(self.description, str):
            raise RecipeError(f"recipe {self.name!r}: description must be a string")
        if self.max_drop is not None and (
                isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float))
                or not 0.0 <= self.max_drop <= 100.0):
            raise RecipeError(f"recipe {self.name!r}: max_drop must be a number of accuracy "
                              f"points in [0, 100] (got {_got(self.max_drop)})")
        if isinstance(self.validation, bool) or not isinstance(self.validation, (int, float)) \
                or not 0.0 < self.validation < 1.0:
            raise RecipeError(f"recipe {self.name!r}: validation must be a fraction in (0, 1) "
                              f"(got {_got(self.validation)})")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise RecipeError(f"recipe {self.name!r}: distill must be a DistillConfig "
                              f"(got {type(self.distill).__name__})")
        if self.metric is not None:
            from nncompress.measure.quality import METRICS

            if not isinstance(self.metric, str) or self.metric not in METRICS:
                raise RecipeError(f"recipe {self.name!r}: unknown metric {_got(self.metric)}; "
                                  f"known: {', '.join(METRICS.names())}")

    # -- dict / YAML ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, default_name: str | None = None) -> Recipe:
        """Validate a recipe mapping ``{name, description?, stages: [...]}``."""
        if not isinstance(data, Mapping):
            raise RecipeError("a recipe must be a mapping with keys 'name' and 'stages' "
                              f"(got {type(data).__name__} {_got(data)})")
        unknown = [str(k) for k in data if k not in _RECIPE_KEYS]
        if unknown:
            raise RecipeError(f"recipe: unknown key {unknown[0]!r}; expected "
                              f"{', '.join(_RECIPE_KEYS)}")
        name = data.get("name", default_name)
        if not isinstance(name, str) or not name.strip():
            raise RecipeError(f"recipe: 'name' must be a non-empty string (got {_got(name)})")
        stages = data.get("stages")
        if stages is None or (isinstance(stages, Sequence) and not stages):
            raise RecipeError(f"recipe {name!r} has no stages")
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
            raise RecipeError(f"recipe {name!r}: 'stages' must be a list "
                              f"(got {type(stages).__name__})")
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise RecipeError(f"recipe {name!r}: 'description' must be a string")
        parsed = [Stage.from_dict(s, index=i) for i, s in enumerate(stages, 1)]
        distill = data.get("distill")
        if distill is not None:
            distill = _validate(DistillConfig, _mapping(distill, f"recipe {name!r} distill",
                                                        "distill"), f"recipe {name!r} distill")
        return cls(name, tuple(parsed), description, data.get("max_drop"),
                   data.get("validation", 0.15), distill, data.get("metric"))

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``Recipe.from_dict(r.to_dict()) == r``."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.max_drop is not None:
            out["max_drop"] = self.max_drop
        if self.validation != 0.15:
            out["validation"] = self.validation
        if self.distill is not None:
            out["distill"] = self.distill.model_dump(mode="json")
        if self.metric is not None:
            out["metric"] = self.metric
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def to_yaml(self) -> str:
        """YAML text; ``Recipe.from_yaml(r.to_yaml()) == r``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """Read a recipe from a YAML file path or from YAML text.

        A ``Path``, or a one-line string ending in ``.yaml``/``.yml`` or naming an existing
        file, is read as a file (its stem is the default name); any other string is YAML text.
        """
        if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
            path = Path(source)
            text = read_text_file(path, DEFAULT_LIMITS.max_bytes, RecipeError, "recipe file")
            return cls.from_dict(_load_yaml(text, str(path)), default_name=path.stem)
        if not isinstance(source, str):
            raise RecipeError(f"from_yaml needs a path or YAML text (got {type(source).__name__})")
        return cls.from_dict(_load_yaml(source, "recipe"))

    # -- named recipes -----------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Names of the recipes packaged in ``nncompress/recipes/*.yaml``."""
        folder = importlib.resources.files(cls.PACKAGE).joinpath(cls.FOLDER)
        if not folder.is_dir():
            return ()
        return tuple(sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                            if p.name.endswith(".yaml")))

    @classmethod
    def named(cls, name: str) -> Recipe:
        """Load a packaged recipe by name, e.g. ``Recipe.named("magnitude-prune")``."""
        known = cls.names()
        if name not in known:
            raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(known) or 'none'}")
        resource = importlib.resources.files(cls.PACKAGE).joinpath(cls.FOLDER, f"{name}.yaml")
        return cls.from_dict(_load_yaml(resource.read_text(encoding="utf-8"), f"{name}.yaml"),
                             default_name=name)

    @classmethod
    def resolve(cls, recipe: Recipe | str | Path) -> Recipe:
        """A Recipe as given, a packaged recipe's name, or the path of a YAML recipe file."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Path):
            return cls.from_yaml(recipe)
        if isinstance(recipe, str):
            if recipe in cls.names():
                return cls.named(recipe)
            if _looks_like_path(recipe):
                return cls.from_yaml(Path(recipe))
            raise RecipeError(f"unknown recipe {recipe!r}; known: {', '.join(cls.names())}; "
                              "or give the path of a .yaml recipe file")
        raise RecipeError(f"a recipe is a Recipe, a name or a YAML path "
                          f"(got {type(recipe).__name__})")


def _looks_like_path(text: str) -> bool:
    """A one-line string ending in .yaml/.yml, or naming anything that exists on disk
    (a FIFO or folder too, so that reading it gives an error saying what it is)."""
    if "\n" in text or not text.strip() or len(text) > 4096:
        return False
    if text.endswith((".yaml", ".yml")):
        return True
    try:
        return os.path.lexists(text)
    except (OSError, ValueError):
        return False


def _load_yaml(text: str, origin: str) -> Any:
    """Bounded safe YAML (:func:`nncompress._yaml.load_bounded`); syntax errors and broken
    limits become one line naming the problem and the position."""
    try:
        return load_bounded(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin}: {describe_error(exc, text)}") from None
    except RecursionError:  # the limits should make this unreachable; never a traceback
        raise RecipeError(f"{origin}: YAML nested too deeply to read") from None
