"""Label-free compression (issue 11, part 1): every registered technique runs in
``nc.compress`` on inputs only (``without_labels``; batches ``(x, None)``), learning from
the uncompressed model where it trains; what needs labels says so in one line; and the
training stages never read labels at all (scrambled labels + KD at alpha 1 give exactly
the weights of the same data without labels)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from helpers import tiny_data
from nncompress import models
from nncompress.data import Dataset, without_labels
from nncompress.errors import DataError
from nncompress.recipe import DistillConfig, Recipe, Stage
from nncompress.technique import all_techniques

#: tiny reference models, built for the tiny data (``[1, 12]`` per sample)
ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [16, 8]},
    "cnn1d": {"channels": [4, 6, 8]},
    "rescnn": {"channels": 6, "hidden": [8, 8]},
}

#: case name (technique, or technique/variant) -> (model, small valid params, epochs 1)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "binarize": ("cnn1d", {"epochs": 1, "keep_first": False}),
    "channel_lasso": ("cnn1d", {"ratio": 0.5, "samples": 64, "batches": 2, "epochs": 1}),
    "dead_units": ("mlp", {}),
    "dynamic_surgery": ("mlp", {"sparsity": 0.5, "epochs": 1}),
    "fold_batchnorm": ("cnn1d", {}),
    "fskd": ("cnn1d", {"samples": 16}),
    "hashed_net": ("mlp", {"compression": 4.0, "epochs": 1}),
    "kd_student": ("mlp", {"size_ratio": 2.0, "epochs": 1}),
    "kd_student/assistants": ("mlp", {"size_ratio": 3.0, "assistants": 1, "epochs": 1}),
    "l1_filter_prune": ("cnn1d", {"ratio": 0.5, "epochs_per_step": 1}),
    "l1_filter_prune/sensitivity": ("cnn1d", {"macs_reduction": 1.5, "epochs_per_step": 1,
                                              "ratios_from": "sensitivity"}),
    "layer_prune": ("rescnn", {"count": 1, "epochs": 1}),
    "low_rank": ("mlp", {"rank_ratio": 0.5, "min_params": 0, "epochs": 1}),
    "lowbit": ("mlp", {"weight_bits": 3, "epochs": 1, "calibration": 32}),
    "magnitude_prune": ("mlp", {"sparsity": 0.5, "steps": 2, "epochs_per_step": 1}),
    "magnitude_prune/gradual": ("mlp", {"sparsity": 0.5, "schedule": "gradual", "steps": 2,
                                        "epochs_per_step": 1, "frequency": 2}),
    "mixed_precision": ("mlp", {"average_bits": 3, "candidates": [2, 4], "epochs": 1,
                                "samples": 4, "calibration": 32}),
    "mixed_precision/accuracy": ("mlp", {"average_bits": 3, "candidates": [2, 4],
                                         "epochs": 1, "samples": 4, "calibration": 32,
                                         "sensitivity": "accuracy"}),
    "network_slimming": ("cnn1d", {"ratio": 0.5, "epochs": 1, "epochs_after": 1}),
    "qat_int8": ("cnn1d", {"epochs": 1, "calibration_batches": 2}),
    "quantize_int8": ("cnn1d", {"calibration_batches": 2}),
    "sparse_vd": ("mlp", {"epochs": 1}),
    "thinet": ("cnn1d", {"ratio": 0.5, "samples": 64, "batches": 2, "epochs": 1}),
    "weight_sharing": ("mlp", {"bits": 3, "epochs": 1, "iters": 10}),
}


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build(arch, (1, 12), 3, **ARCHS[arch])


def run(model: nn.Module, recipe: Recipe, data: Dataset, **kw: Any) -> nc.CompressionResult:
    return nc.compress(model, recipe, data, progress=False, measure_latency=False, **kw)


def technique(case: str) -> str:
    return case.split("/")[0]


def scrambled(seed: int = 5) -> Dataset:
    """``tiny_data`` with every label replaced by a random class."""
    x, y = tiny_data().train.dataset.tensors
    noise = torch.randint(0, 3, y.shape, generator=torch.Generator().manual_seed(seed))
    ds = TensorDataset(x, noise)
    return Dataset("scrambled", DataLoader(ds, batch_size=16, shuffle=True,
                                           generator=torch.Generator()),
                   DataLoader(ds, batch_size=48), (1, 12), 3)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


#: techniques that need labels by their nature, refused on inputs only before any work
NEEDS_LABELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cs_kd": ("mlp", {"epochs": 1}),
}


def test_every_registered_technique_has_a_label_free_case() -> None:
    assert set(all_techniques().names()) == {technique(c) for c in CASES} | set(NEEDS_LABELS)


@pytest.mark.parametrize("name", sorted(NEEDS_LABELS))
def test_a_technique_that_needs_labels_refuses_inputs_only_in_one_line(name: str) -> None:
    arch, params = NEEDS_LABELS[name]
    with pytest.raises(DataError) as info:
        run(tiny(arch), Recipe("t", (Stage.technique(name, **params),)),
            without_labels(tiny_data()))
    assert "needs labelled data" in one_line(info) and name in str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_technique_compresses_from_inputs_only(case: str) -> None:
    """The batches are ``(x, None)``: a stage reading labels would fail on ``y``; the
    stages that train distil from the uncompressed model; quality is the top-1 agreement
    with it (the default metric on inputs only)."""
    arch, params = CASES[case]
    data = without_labels(tiny_data())
    assert not data.labelled and data.num_classes == 0
    result = run(tiny(arch), Recipe("t", (Stage.technique(technique(case), **params),)), data)
    assert result.baseline.metric == result.final.metric == "agreement"
    assert result.baseline.accuracy == pytest.approx(1.0, abs=1e-5)  # itself vs itself
    assert math.isfinite(result.final.accuracy) and 0.0 <= result.final.accuracy <= 1.0
    assert any("distil from the uncompressed input model (the data has no labels)" in line
               for line in result.log), result.log
    assert "top-1 agreement with teacher" in result.table()


def test_an_embedding_model_compresses_with_cosine_fidelity_from_inputs_only() -> None:
    """The transformer as a mean-pooled embedder: metric cosine, and ``loss: auto`` then
    distils with the cosine loss (named in the log)."""
    from nncompress.models.transformer import embedder_of

    torch.manual_seed(0)
    model = embedder_of(models.build("transformer", (1, 12), 3, dim=8, depth=1, num_heads=2,
                                     head_dim=4, mlp_dim=8))
    recipe = Recipe("e", (Stage.technique("magnitude_prune", sparsity=0.5, steps=1,
                                          epochs_per_step=1),))
    result = run(model, recipe, without_labels(tiny_data()), metric="cosine")
    assert result.final.metric == "cosine" and 0.0 < result.final.accuracy <= 1.0 + 1e-6
    assert any("cosine loss" in line for line in result.log), result.log
    assert "cosine to teacher" in result.table()


def test_distillation_fine_tune_recovers_quality_without_labels() -> None:
    """Pruning loses fidelity to the teacher; KD fine-tuning on inputs alone wins it back."""
    model = tiny("mlp")
    nc.fit(model, tiny_data(), epochs=3, lr=1e-2, progress=False)
    data = without_labels(tiny_data())
    prune = Stage.technique("magnitude_prune", sparsity=0.7, steps=1, epochs_per_step=0)
    pruned = run(model, Recipe("p", (prune,)), data)
    tuned = run(model, Recipe("p", (prune, Stage.fine_tune(epochs=3, lr=1e-2))), data)
    assert pruned.final.params.nonzero == tuned.final.params.nonzero  # masks held
    assert tuned.final.accuracy > pruned.final.accuracy


def test_a_stage_that_needs_labels_says_so_in_one_line() -> None:
    """``teacher="none"`` means cross-entropy on the labels, which inputs only cannot give."""
    data = without_labels(tiny_data())
    with pytest.raises(DataError) as info:
        run(tiny("mlp"), Recipe("ft", (Stage.fine_tune(epochs=1, lr=1e-3),)), data,
            teacher="none")
    assert "needs labels" in one_line(info) and "inputs only" in str(info.value)


def test_post_training_stages_need_no_teacher_to_train_with() -> None:
    """``teacher="none"`` is fine on inputs only while no stage trains."""
    data = without_labels(tiny_data())
    result = run(tiny("cnn1d"), Recipe("q", (Stage.technique("quantize_int8",
                                                            calibration_batches=2),)),
                 data, teacher="none")
    assert result.final.accuracy > 0.9
    assert any("no teacher" in line for line in result.log)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"metric": "accuracy"}, "needs labelled data"),
    ({"max_drop": 1.0, "metric": "kl"}, "max_drop 1 on inputs only is a budget in points"),
    ({"max_drop": 1.0, "metric": "mse"}, "where higher is better (agreement, cosine, r2)"),
])
def test_an_accuracy_metric_or_a_budget_in_a_lower_is_better_metric_is_refused(
        kwargs: dict[str, Any], words: str, monkeypatch) -> None:
    monkeypatch.setattr("nncompress.api.decompose", lambda *a: pytest.fail("a stage ran"))
    recipe = Recipe("p", (Stage.technique("magnitude_prune", sparsity=0.5, steps=1,
                                          epochs_per_step=1),))
    with pytest.raises(DataError) as info:
        run(tiny("mlp"), recipe, without_labels(tiny_data()), **kwargs)
    assert words in one_line(info)


@pytest.mark.parametrize("metric", ["agreement", "cosine"])
def test_max_drop_on_inputs_only_backs_off_in_points_of_the_metric(metric: str) -> None:
    """On inputs only the budget is the metric against the uncompressed model on held-out
    training inputs (its reference is the model's own 1.0): 97 % sparsity breaks the
    budget, the run backs off, and the kept model meets it on that split."""
    from nncompress.data import holdout
    from nncompress.measure import quality

    torch.manual_seed(0)
    labelled = tiny_data(n=400)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    nc.fit(model, labelled, epochs=30, lr=1e-2, progress=False)
    data = without_labels(labelled)
    recipe = Recipe("harsh", (Stage.technique("magnitude_prune", sparsity=0.97, steps=1,
                                              epochs_per_step=0),), max_drop=2.0)
    result = run(model, recipe, data, metric=metric)
    log = "\n".join(result.log)
    assert "validation split of 0.15 of the training inputs (seed 0); reference: the " \
           "uncompressed model's 1.0000" in log
    assert "backing stage 1 magnitude_prune off" in log
    assert result.stages[0].params["sparsity"] < 0.97
    _, held = holdout(data, 0.15, seed=0)
    kept = quality(result.model, held, metric, teacher=model)
    assert 100 * (1.0 - kept) <= 2.0 + 1e-9


def test_kd_with_alpha_zero_is_cross_entropy_and_needs_labels() -> None:
    recipe = Recipe("ft", (Stage.fine_tune(epochs=1, lr=1e-3),),
                    distill=DistillConfig(alpha=0.0, loss="kd"))
    with pytest.raises(DataError) as info:
        run(tiny("mlp"), recipe, without_labels(tiny_data()))
    assert "needs labels" in one_line(info)


TRAINING = {
    "fine_tune": ("mlp", Stage.fine_tune(epochs=2, lr=1e-2)),
    "magnitude_prune": ("mlp", Stage.technique("magnitude_prune", sparsity=0.5, steps=2,
                                               epochs_per_step=1, lr=1e-2)),
    "weight_sharing": ("mlp", Stage.technique("weight_sharing", bits=3, epochs=1, iters=10)),
    "qat_int8": ("cnn1d", Stage.technique("qat_int8", epochs=1, calibration_batches=2)),
    "binarize": ("cnn1d", Stage.technique("binarize", epochs=1, keep_first=False)),
}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_stages_never_read_labels(name: str) -> None:
    """KD at alpha 1 ignores labels: random labels and no labels give the same weights,
    bit for bit. (``loss: kd`` is spelt out: ``auto`` follows the quality metric, which
    is accuracy on labelled data and agreement on inputs only. The calibration batches of
    int8 / binarize come from the loader reseeded with the run's seed -- the labelled
    loader here starts from an unseeded generator.)"""
    arch, stage = TRAINING[name]
    recipe = Recipe("r", (stage,), distill=DistillConfig(alpha=1.0, loss="kd"))
    labelled = scrambled()
    with_noise = run(tiny(arch), recipe, labelled, teacher="original").model.state_dict()
    inputs_only = run(tiny(arch), recipe, without_labels(labelled),
                      teacher="original").model.state_dict()
    assert with_noise.keys() == inputs_only.keys()
    assert all(torch.equal(with_noise[k], inputs_only[k]) for k in with_noise)
    original = tiny(arch).state_dict()
    assert any(k not in original or not torch.equal(v, original[k])
               for k, v in inputs_only.items())   # the stage changed something


def test_int8_calibration_does_not_depend_on_how_far_the_loader_was_read() -> None:
    data = tiny_data()
    recipe = Recipe("q", (Stage.technique("quantize_int8", calibration_batches=2),))
    first = run(tiny("cnn1d"), recipe, data).model.state_dict()
    for _ in data.train:    # moves the loader's shuffle generator on
        pass
    again = run(tiny("cnn1d"), recipe, data).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("method", ["multi_task_zipping", "confidence_cascade", "learned_router",
                                    "shared_backbone"])
def test_multi_model_methods_refuse_inputs_only_before_touching_a_model(method: str) -> None:
    """The multi-model methods work over classes (re-training, calibrating on accuracy,
    heads per class): inputs only is a one-line DataError, raised first."""
    from nncompress.share import methods

    data = without_labels(tiny_data())
    a, b = tiny("mlp"), tiny("mlp")
    before = [p.detach().clone() for p in a.parameters()]
    count = 1 if method == "shared_backbone" else 2
    tasks = (data,) * (2 if method == "multi_task_zipping" else 1)
    inputs = methods.MultiInputs((a, b)[:count], ("a", "b")[:count], tasks,
                                 calibration=data.test)
    run = {"multi_task_zipping": methods.run_zip, "confidence_cascade": methods.run_cascade,
           "learned_router": methods.run_router, "shared_backbone": methods.run_branches}
    extra = {} if method in ("multi_task_zipping", "shared_backbone") else {"budget_macs": 100.0}
    with pytest.raises(DataError) as info:
        run[method](inputs, methods.configure(method, **extra))
    assert "a method over classes" in one_line(info)
    assert all(torch.equal(p, q) for p, q in zip(before, a.parameters(), strict=True))
