"""The multi-model methods as registry entries: each a validated config and one function
``run(inputs, config) -> MultiResult`` (importing this module registers them in
:data:`nncompress.technique.MULTI_MODEL_METHODS`).

- ``multi_task_zipping`` (``nncompress zip``): He, Zhou & Thiele (2018), multi-task
  zipping (:func:`nncompress.share.zipping.zip_models`);
- ``confidence_cascade`` (``nncompress cascade``) and ``learned_router``
  (``nncompress router``): Eshratifar & Pedram (2020), run-time model multiplexing
  (:mod:`nncompress.share.multiplex`, :mod:`nncompress.share.router`);
- ``shared_backbone`` (``nncompress branches``): one frozen backbone with a head per task,
  the multi-branch networks of the survey's multiplexing section (Zhang, Ye & Luo 2019;
  :func:`nncompress.share.branches.train_heads`).

Every result model saves as one ``.nnc`` file (:mod:`nncompress.share.composite`); its
rows are measured the same way for the inputs and for the result: test accuracy per task,
parameters, MACs per input (the average as routed on the test split for a multiplexer) and
the bytes of the ``.nnc`` file ``nc.save`` writes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from nncompress.data import example_input
from nncompress.errors import ModelError, RecipeError, UnsupportedLayerError
from nncompress.measure import accuracy, artifact_bytes, count_macs, count_params
from nncompress.share._zip_layers import unsupported
from nncompress.share.composite import (
    BranchesModel,
    CascadeModel,
    MultiplexerModel,
    check_member,
    output_layer,
)
from nncompress.share.multi_io import (
    MultiInputs,
    MultiResult,
    Row,
    check_fits,
    check_labelled,
    measure_row,
    model_output,
    task_outputs,
)
from nncompress.technique import MULTI_MODEL_METHODS, MultiModelMethod, TechniqueConfig

__all__ = ["BranchesConfig", "CascadeConfig", "MultiInputs", "MultiResult", "RouterConfig",
           "Row", "ZipConfig", "check_fits", "check_zippable", "configure", "run_branches",
           "run_cascade", "run_router", "run_zip", "task_outputs"]


# --------------------------------------------------------------------------- configs


class ZipConfig(TechniqueConfig):
    """MTZ settings: ``share`` per zipped layer from the input side (one number: every
    hidden layer), re-training epochs after each merge and at the end."""

    share: tuple[Annotated[float, Field(ge=0.0, le=1.0)], ...] = Field((1.0,), min_length=1)
    criterion: Literal["hessian", "euclidean"] = "hessian"
    retrain_epochs: int = Field(2, ge=0)
    final_epochs: int = Field(5, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    damping: float = Field(1e-3, gt=0.0)

    @field_validator("share", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value


class CascadeConfig(TechniqueConfig):
    """Confidence cascade: average MACs per input allowed (calibrated on held-out data)."""

    budget_macs: float = Field(gt=0.0)


class RouterConfig(TechniqueConfig):
    """Learned router: MAC budget (router included), the router's hidden width, training."""

    budget_macs: float = Field(gt=0.0)
    hidden: int = Field(32, ge=1)
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    fit_fraction: float = Field(0.7, gt=0.0, lt=1.0)


class BranchesConfig(TechniqueConfig):
    """Shared backbone: head training and shape (``head_hidden`` 0: one Linear per task)."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-2, gt=0.0)
    head_hidden: int = Field(0, ge=0)


def configure(method: str, **params: Any) -> TechniqueConfig:
    """The validated config of multi-model method ``method``; a bad value is a one-line
    RecipeError naming it."""
    config = MULTI_MODEL_METHODS.get(method).config
    try:
        return config.model_validate(params)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "config"
        raise RecipeError(f"{method}: {where} {error['msg'].lower()} "
                          f"(got {error.get('input')!r})") from None


# --------------------------------------------------------------------------- zip


def check_zippable(model: nn.Module, name: str) -> None:
    """Every layer holding parameters is a Linear / Conv1d / Conv2d (BatchNorms fold away);
    else UnsupportedLayerError naming the layer."""
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if next(module.parameters(recurse=False), None) is None:
            continue
        why = unsupported(module)
        if why is not None:
            raise UnsupportedLayerError(
                f"zip: model {name!r} has layer {path or '(root)'!r}: {why}; multi-task "
                "zipping handles chains of Linear / Conv1d / Conv2d layers (BatchNorm "
                "folded) with parameter-free operations between them")


def run_zip(inputs: MultiInputs, config: ZipConfig) -> MultiResult:
    """Zip two task models (He, Zhou & Thiele 2018); rows: the two models, the zipped."""
    from nncompress.share.zipping import zip_models

    check_labelled(inputs, "zip")
    for model, name in zip(inputs.models, inputs.names, strict=True):
        check_zippable(model, name)
    check_fits(inputs, "zip", same_classes=False)
    a, b = inputs.models
    share = config.share[0] if len(config.share) == 1 else list(config.share)  # one: all
    r = zip_models(a, b, *inputs.tasks, share=share, damping=config.damping,
                   retrain_epochs=config.retrain_epochs, final_epochs=config.final_epochs,
                   lr=config.lr, criterion=config.criterion, seed=inputs.seed)
    shares = "/".join(f"{s:g}" for s in config.share)
    rows = (Row("two separate models", r.accuracy_before, r.params_before,
                float(r.macs_before), artifact_bytes(a) + artifact_bytes(b)),
            Row(f"zipped (share {shares})", r.accuracy_after, r.params_after,
                float(r.macs_after), artifact_bytes(r.model)))
    merges = enumerate(zip(r.shared, r.merge_error, strict=True))
    notes = [f"layer {i + 1}: {k} of {n_a} / {n_b} units merged (layer-wise error increase "
             f"{e:.4g})" for i, ((k, n_a, n_b), e) in merges]
    notes.append("test accuracy right after the last merge, before re-training: "
                 + " / ".join(f"{100 * v:.2f} %" for v in r.accuracy_merged[-1]))
    return MultiResult(r.model, tuple(t.name for t in inputs.tasks), rows, tuple(notes),
                       {"shared": [list(s) for s in r.shared]})


# --------------------------------------------------------------------------- multiplexers


def _members_rows(inputs: MultiInputs) -> list[Row]:
    return [measure_row(name, model, inputs.tasks)
            for model, name in zip(inputs.models, inputs.names, strict=True)]


def _shares(names: Sequence[str], share: Sequence[float]) -> str:
    pairs = zip(names, share, strict=True)
    return "answered by " + ", ".join(f"{n} {100 * s:.1f} %" for n, s in pairs)


def _multiplexer_inputs(inputs: MultiInputs, what: str) -> None:
    if len(inputs.models) < 2 or len(inputs.tasks) != 1:
        raise ModelError(f"{what}: needs at least two models of one task")
    check_labelled(inputs, what)
    if inputs.calibration is None:
        raise ModelError(f"{what}: needs held-out calibration data the models did not "
                         "train on")
    for i, (model, name) in enumerate(zip(inputs.models, inputs.names, strict=True)):
        check_member(model, f"{what} model {i} ({name!r})")
    check_fits(inputs, what, same_classes=True)
    x = example_input(inputs.tasks[0], 1)
    costs = [count_macs(m, x).total for m in inputs.models]
    if costs != sorted(costs):
        listed = ", ".join(f"{n} {c:,}" for n, c in zip(inputs.names, costs, strict=True))
        raise ModelError(f"{what}: give the models cheapest first; MACs per input: {listed}")


def run_cascade(inputs: MultiInputs, config: CascadeConfig) -> MultiResult:
    """Calibrate a confidence cascade (Eshratifar & Pedram 2020) within the MAC budget."""
    from nncompress.share.multiplex import calibrate_cascade, evaluate_thresholds

    _multiplexer_inputs(inputs, "cascade")
    models, data = list(inputs.models), inputs.tasks[0]
    calibrated = calibrate_cascade(models, data, budget_macs=config.budget_macs,
                                   calibration=inputs.calibration)
    model = CascadeModel(models, calibrated.thresholds).eval()
    point = evaluate_thresholds(models, data, calibrated.thresholds)
    levels = ", ".join(f"{t:g}" for t in calibrated.thresholds)
    rows = (*_members_rows(inputs),
            measure_row(f"cascade (thresholds {levels})", model, inputs.tasks,
                        macs=point.avg_macs))
    notes = (f"thresholds calibrated on held-out data for at most {config.budget_macs:,.0f} "
             "MACs per input on average; MACs of the cascade: the average on the test split",
             _shares(inputs.names, point.share))
    return MultiResult(model, (data.name,), rows, notes,
                       {"thresholds": list(calibrated.thresholds),
                        "budget_macs": config.budget_macs})


def run_router(inputs: MultiInputs, config: RouterConfig) -> MultiResult:
    """Train a learned router (Eshratifar & Pedram 2020) for the MAC budget."""
    from nncompress.share.router import default_router, router_curve, train_router

    _multiplexer_inputs(inputs, "router")
    models, data = list(inputs.models), inputs.tasks[0]
    torch.manual_seed(inputs.seed)  # the router's initial weights depend on the seed only
    router = default_router(data.input_shape, len(models), hidden=config.hidden)
    mux = train_router(models, data, inputs.calibration, budget_macs=config.budget_macs,
                       router=router, epochs=config.epochs, lr=config.lr,
                       fit_fraction=config.fit_fraction, seed=inputs.seed)
    model = MultiplexerModel(models, mux.router, mux.threshold).eval()
    point = next(p for p in router_curve(mux, data) if p.threshold == mux.threshold)
    rows = (*_members_rows(inputs),
            measure_row(f"router (threshold {mux.threshold:g})", model, inputs.tasks,
                 macs=point.avg_macs))
    notes = (f"router trained and its threshold calibrated on held-out data for at most "
             f"{config.budget_macs:,.0f} MACs per input on average (router included); MACs "
             "of the multiplexer: the average on the test split", _shares(inputs.names,
                                                                           point.share))
    return MultiResult(model, (data.name,), rows, notes,
                       {"threshold": mux.threshold, "budget_macs": config.budget_macs})


# --------------------------------------------------------------------------- branches


class _Restricted(nn.Module):
    """A classifier's logits for ``classes`` only (a task cut from its dataset)."""

    def __init__(self, model: nn.Module, classes: Sequence[int]) -> None:
        super().__init__()
        self.model, self.index = model, list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.index]


def _check_output_layer(model: nn.Module, path: str, x: torch.Tensor, name: str) -> int:
    """The Linear at ``path`` computes ``model``'s output; returns its input width."""
    layer = model.get_submodule(path)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    finally:
        hook.remove()
    if not (len(seen) == 1 and isinstance(out, torch.Tensor) and torch.equal(out, seen[0])):
        raise UnsupportedLayerError(f"branches: the last Linear of {name!r}, {path!r}, does "
                                    "not give the model's output; the backbone must be a "
                                    "classifier that ends in a Linear layer")
    return layer.in_features


def _baseline(inputs: MultiInputs) -> tuple[float | None, ...]:
    """The classifier restricted to each task's classes (``None`` for a task that is not
    a class subset of the classifier's dataset)."""
    model = inputs.models[0]
    classes = inputs.classes or (None,) * len(inputs.tasks)
    with torch.no_grad():
        width = model.eval()(example_input(inputs.tasks[0], 1)).shape[-1]
    return tuple(None if c is None or max(c) >= width else accuracy(_Restricted(model, c), t.test)
                 for c, t in zip(classes, inputs.tasks, strict=True))


def run_branches(inputs: MultiInputs, config: BranchesConfig) -> MultiResult:
    """Freeze a classifier's layers below its output layer and train one head per task."""
    from nncompress.share.branches import train_heads

    if len(inputs.models) != 1 or not inputs.tasks:
        raise ModelError("branches: needs one backbone model and at least one task")
    check_labelled(inputs, "branches")
    classifier, name = inputs.models[0], inputs.names[0]
    check_member(classifier, f"the backbone {name!r}")
    model_output(classifier, name, inputs.tasks[0], "branches")
    path = output_layer(classifier)
    features = _check_output_layer(classifier, path, example_input(inputs.tasks[0], 2), name)
    torch.manual_seed(inputs.seed)
    heads = [nn.Linear(features, t.num_classes) if config.head_hidden == 0 else
             nn.Sequential(nn.Linear(features, config.head_hidden), nn.ReLU(),
                           nn.Linear(config.head_hidden, t.num_classes)) for t in inputs.tasks]
    model = BranchesModel(copy.deepcopy(classifier), path, heads)
    train_heads(model.backbone, list(model.heads), list(inputs.tasks), epochs=config.epochs,
                lr=config.lr, seed=inputs.seed, progress=inputs.progress)
    model.eval()
    x1 = example_input(inputs.tasks[0], 1)
    base = Row(f"{name}, its outputs for each task's classes", _baseline(inputs),
               count_params(classifier).total, float(count_macs(classifier, x1).total),
               artifact_bytes(classifier))
    rows = (base, measure_row(f"shared backbone + {len(heads)} heads", model, inputs.tasks))
    notes = (f"backbone: {name!r} up to its output layer {path!r} ({features} features), "
             f"frozen; heads trained {config.epochs} epochs each",)
    return MultiResult(model, tuple(t.name for t in inputs.tasks), rows, notes,
                       {"cut": path})


# --------------------------------------------------------------------------- registry

_MULTIPLEXING = ("Eshratifar & Pedram (2020): Runtime deep model multiplexing for reduced "
                 "latency and energy consumption inference")
for _method in (
    MultiModelMethod(
        "multi_task_zipping", "zip", "sparse-representation",
        "He, Zhou & Thiele (2018): Multi-task zipping via layer-wise neuron sharing",
        "merge two models' neurons / filters layer by layer by a Hessian-based cost, then "
        "re-train both tasks", "two Linear/Conv chain models on one input, one task each",
        ZipConfig, run_zip),
    MultiModelMethod(
        "confidence_cascade", "cascade", "sparse-representation", _MULTIPLEXING,
        "each input goes to the cheapest model first and on to the next while the model is "
        "unsure; thresholds calibrated for a MAC budget",
        "two or more models of one task, cheapest first, and held-out data",
        CascadeConfig, run_cascade),
    MultiModelMethod(
        "learned_router", "router", "sparse-representation", _MULTIPLEXING,
        "a small network picks the model for each input; its threshold calibrated for a "
        "MAC budget", "two or more models of one task, cheapest first, and held-out data",
        RouterConfig, run_router),
    MultiModelMethod(
        "shared_backbone", "branches", "sparse-representation",
        "Zhang, Ye & Luo (2019): MBFN, a multi-branch face network for facial analysis",
        "one frozen backbone computed once per input and one small trained head per task",
        "one classifier (its output layer is replaced) and a dataset or class subset per "
        "task", BranchesConfig, run_branches),
):
    MULTI_MODEL_METHODS.register(_method.name, _method)
