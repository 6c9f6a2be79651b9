"""Distillation trainers and techniques (issue 11): KD / hints / RONA through the one
training loop, CS-KD, the teacher-assistant chain, kd_student in a recipe, and the
teacher that every training stage of ``compress`` learns from."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import models, train
from nncompress.data import without_labels
from nncompress.distill.losses import KDLoss
from nncompress.distill.trainer import chain_ratios, cskd_fit, distill, takd
from nncompress.errors import DataError, ModelError, RecipeError
from nncompress.measure import quality
from nncompress.recipe import DistillConfig, Recipe, Stage


def tiny(arch: str = "mlp", **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    return models.build(arch, (1, 12), 3, **(kw or {"hidden": [32, 16]}))


def trained_teacher() -> nn.Module:
    model = tiny()
    train.fit(model, tiny_data(), epochs=4, lr=1e-2, progress=False)
    return model


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_chain_ratios_are_geometric_and_end_at_the_target() -> None:
    assert chain_ratios(10.0, 0) == (10.0,)
    r = chain_ratios(16.0, 3)
    assert r == pytest.approx((2.0, 4.0, 8.0, 16.0))
    for bad in (1.0, 0.5, float("inf")):
        with pytest.raises(RecipeError, match="size_ratio"):
            chain_ratios(bad, 1)
    with pytest.raises(RecipeError, match="assistants"):
        chain_ratios(4.0, -1)


def test_ta_chain_sizes_strictly_decrease_and_each_link_learns() -> None:
    teacher = trained_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = takd(teacher, tiny_data(), size_ratio=6.0, assistants=2, epochs=2, lr=1e-2,
                  progress=False)
    sizes = [result.teacher_params, *(link.params for link in result.links)]
    assert len(result.links) == 3
    assert all(a > b for a, b in itertools.pairwise(sizes))
    assert sizes[0] / sizes[-1] == pytest.approx(6.0, rel=0.2)
    assert all(0.0 <= link.quality <= 1.0 for link in result.links)
    assert result.student is result.links[-1].model
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_ta_chain_that_cannot_shrink_is_refused() -> None:
    small = tiny(hidden=[2])
    with pytest.raises(ModelError):
        takd(small, tiny_data(), size_ratio=1.5, assistants=3, epochs=1, progress=False)


def test_distill_on_inputs_only_moves_the_student_towards_the_teacher() -> None:
    teacher = trained_teacher()
    data = without_labels(tiny_data())
    student = tiny(hidden=[8])
    start = quality(student, data.test, "kl", teacher=teacher)
    log = distill(student, teacher, data, epochs=4, lr=1e-2, progress=False)
    assert log.metric == "agreement" and len(log.test_acc) == 4
    assert quality(student, data.test, "kl", teacher=teacher) < 0.75 * start


def test_hints_train_an_adapter_and_a_bad_layer_name_is_one_line() -> None:
    teacher = trained_teacher()
    student = tiny(hidden=[8, 4])
    log = distill(student, teacher, tiny_data(), epochs=2, lr=1e-2, progress=False,
                  hints={"layers.fc1": "layers.fc1"}, hint_loss="angular")
    assert log.epochs == 2
    with pytest.raises(ModelError) as info:
        distill(tiny(hidden=[8]), teacher, tiny_data(), epochs=1, progress=False,
                hints={"layers.fc9": "layers.fc1"})
    assert "layers.fc9" in str(info.value) and "\n" not in str(info.value)


def test_rona_noise_changes_the_result_and_is_seeded() -> None:
    teacher = trained_teacher()

    def run(noise: float | None, seed: int = 0) -> dict[str, torch.Tensor]:
        student = tiny(hidden=[8])
        distill(student, teacher, tiny_data(), epochs=1, lr=1e-2, progress=False,
                privacy_noise=noise, seed=seed)
        return student.state_dict()

    plain, noisy, again = run(None), run(0.5), run(0.5)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert any(not torch.equal(plain[k], noisy[k]) for k in plain)


def test_cskd_trains_with_labels_and_refuses_inputs_only() -> None:
    model = tiny()
    log = cskd_fit(model, tiny_data(), epochs=2, lr=1e-2, progress=False)
    assert log.final_test_acc is not None and log.final_test_acc > 0.5
    with pytest.raises(DataError) as info:
        cskd_fit(tiny(), without_labels(tiny_data()), epochs=1, progress=False)
    assert "needs labelled data" in str(info.value) and "\n" not in str(info.value)


def test_fit_on_inputs_only_needs_a_teacher() -> None:
    with pytest.raises(DataError) as info:
        train.fit(tiny(), without_labels(tiny_data()), epochs=1, progress=False)
    assert "needs labels" in str(info.value) and "\n" not in str(info.value)
    teacher = train.Teacher(trained_teacher().eval(), KDLoss(temperature=2.0))
    log = train.fit(tiny(), without_labels(tiny_data()), epochs=1, progress=False,
                    teacher=teacher)
    assert log.metric == "agreement" and log.train_acc[0] != log.train_acc[0]  # nan


def test_kd_student_stage_returns_a_smaller_model_that_saves_and_loads(tmp_path) -> None:
    teacher = trained_teacher()
    recipe = Recipe("s", (Stage.technique("kd_student", size_ratio=4.0, epochs=10,
                                               lr=3e-2),))
    result = nc.compress(teacher, recipe, tiny_data(), progress=False,
                         measure_latency=False)
    assert params(teacher) / params(result.model) == pytest.approx(4.0, rel=0.15)
    assert result.final.accuracy > 0.5
    assert any("kd_student" in line and "fewer than the teacher" in line for line in result.log)
    nc.save(result.model, tmp_path / "s.nnc")
    back = nc.load(tmp_path / "s.nnc")
    x = torch.randn(5, 1, 12)
    assert torch.allclose(back(x), result.model(x), atol=1e-6)


def test_compress_teacher_original_distils_every_training_stage() -> None:
    model = trained_teacher()
    stages = (Stage.technique("magnitude_prune", sparsity=0.6, steps=1, epochs_per_step=1),
              Stage.fine_tune(epochs=1, lr=1e-3))
    recipe = Recipe("p", stages, distill=DistillConfig(temperature=2.0, alpha=0.5))
    result = nc.compress(model, recipe, tiny_data(), progress=False, measure_latency=False)
    assert any("kd loss, T=2, alpha=0.5" in line for line in result.log)
    plain = nc.compress(model, recipe, tiny_data(), progress=False, measure_latency=False,
                        teacher="none")
    assert any("no teacher" in line for line in plain.log)
    a, b = result.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RecipeError, match="teacher must be"):
        nc.compress(model, recipe, tiny_data(), teacher="teacher")


def test_compress_with_a_given_teacher_module() -> None:
    big = trained_teacher()
    small = tiny(hidden=[8])
    recipe = Recipe("f", (Stage.fine_tune(epochs=1, lr=1e-2),))
    result = nc.compress(small, recipe, tiny_data(), progress=False, measure_latency=False,
                         teacher=big)
    assert any("the given teacher MLP" in line for line in result.log)
