"""The training loop: it learns, it is deterministic, hooks run, logs are honest."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from nncompress import models
from nncompress.data import Dataset, load_dataset
from nncompress.errors import DataError
from nncompress.train import LR_SCHEDULES, TrainLog, evaluate, fine_tune, fit


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNCOMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_dataset("digits", batch_size=64)


def _small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp", (1, 8, 8), 10, hidden=[32])


def test_fit_learns_a_small_task(digits: Dataset) -> None:
    model = _small_mlp()
    before = evaluate(model, digits.test)
    log = fit(model, digits, epochs=3, lr=1e-2, progress=False)
    assert before < 0.3
    assert log.final_test_acc is not None and log.final_test_acc > 0.85
    assert log.final_test_acc == pytest.approx(evaluate(model, digits.test))
    assert log.loss[-1] < log.loss[0]
    assert not model.training  # ends in eval mode


def test_fit_is_deterministic_even_on_a_reused_loader(digits: Dataset) -> None:
    a, b = _small_mlp(), _small_mlp()
    log_a = fit(a, digits, epochs=2, seed=5, progress=False)
    log_b = fit(b, digits, epochs=2, seed=5, progress=False)  # same loader, iterated before
    assert log_a.loss == log_b.loss and log_a.test_acc == log_b.test_acc
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = _small_mlp()
    log_c = fit(c, digits, epochs=2, seed=6, progress=False)
    assert log_c.loss != log_a.loss


def test_after_step_runs_after_every_optimizer_step(digits: Dataset) -> None:
    seen: list[nn.Module] = []
    model = _small_mlp()
    fit(model, digits, epochs=2, progress=False, after_step=seen.append)
    assert len(seen) == 2 * len(digits.train)
    assert all(m is model for m in seen)


def test_after_step_can_enforce_a_mask(digits: Dataset) -> None:
    model = _small_mlp()
    fc1 = model.layers.fc1
    mask = torch.rand_like(fc1.weight) > 0.5

    def apply_mask(m: nn.Module) -> None:
        with torch.no_grad():
            m.layers.fc1.weight.mul_(mask)

    apply_mask(model)
    fit(model, digits, epochs=1, lr=1e-2, progress=False, after_step=apply_mask)
    assert bool((fc1.weight[~mask] == 0).all())
    assert bool((fc1.weight[mask] != 0).any())


def test_extra_loss_is_added(digits: Dataset) -> None:
    plain = fit(_small_mlp(), digits, epochs=1, progress=False)
    shifted = fit(_small_mlp(), digits, epochs=1, progress=False,
                  extra_loss=lambda m: torch.tensor(2.5))
    assert shifted.loss[0] == pytest.approx(plain.loss[0] + 2.5, abs=1e-5)
    calls: list[int] = []

    def l2(m: nn.Module) -> torch.Tensor:
        calls.append(1)
        return 10.0 * sum(p.pow(2).sum() for p in m.parameters())

    model = _small_mlp()
    norm_before = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    fit(model, digits, epochs=1, lr=1e-2, progress=False, extra_loss=l2)
    assert len(calls) == len(digits.train)
    assert sum(float(p.detach().pow(2).sum()) for p in model.parameters()) < norm_before


def test_train_log_shape_and_frozen(digits: Dataset) -> None:
    log = fit(_small_mlp(), digits, epochs=2, progress=False)
    assert isinstance(log, TrainLog) and log.epochs == 2
    assert all(len(v) == 2 for v in (log.loss, log.train_acc, log.test_acc, log.seconds))
    assert all(0.0 <= a <= 1.0 for a in log.train_acc + log.test_acc)
    assert all(s > 0 for s in log.seconds)
    assert log.total_seconds == pytest.approx(sum(log.seconds))
    with pytest.raises(FrozenInstanceError):
        log.loss = ()  # type: ignore[misc]


def test_zero_epochs_changes_nothing(digits: Dataset) -> None:
    model = _small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = fit(model, digits, epochs=0, progress=False)
    assert log.epochs == 0 and log.final_test_acc is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="epochs"):
        fit(model, digits, epochs=-1, progress=False)


def test_fine_tune_uses_a_small_learning_rate(digits: Dataset) -> None:
    tuned, trained = _small_mlp(), _small_mlp()
    start = tuned.layers.fc1.weight.detach().clone()
    fine_tune(tuned, digits, epochs=1, progress=False)
    fit(trained, digits, epochs=1, progress=False)
    moved_tuned = float((tuned.layers.fc1.weight.detach() - start).abs().max())
    moved_trained = float((trained.layers.fc1.weight.detach() - start).abs().max())
    assert 0 < moved_tuned < moved_trained


def test_cosine_schedule_and_unknown_schedule(digits: Dataset) -> None:
    assert LR_SCHEDULES["constant"](0.7) == 1.0
    assert LR_SCHEDULES["cosine"](0.0) == 1.0
    assert LR_SCHEDULES["cosine"](0.5) == pytest.approx(0.5)
    assert LR_SCHEDULES["cosine"](0.999) < 1e-4
    log = fit(_small_mlp(), digits, epochs=1, progress=False, lr_schedule="cosine")
    assert log.epochs == 1 and math.isfinite(log.loss[0])
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(_small_mlp(), digits, epochs=1, progress=False, lr_schedule="step")


def test_evaluate_counts_correct_and_sets_eval_mode(digits: Dataset) -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 10)
            logits[:, 3] = 1.0
            return logits

    model = Constant().train()
    labels = torch.cat([y for _, y in digits.test])
    assert evaluate(model, digits.test) == pytest.approx(float((labels == 3).float().mean()))
    assert not model.training
    with pytest.raises(DataError, match="no samples"):
        evaluate(model, [])


def test_progress_bar_goes_to_stderr(digits: Dataset,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    fit(_small_mlp(), digits, epochs=1, progress=True, desc="unit-test-bar")
    captured = capsys.readouterr()
    assert "unit-test-bar" in captured.err
    assert captured.out == ""
    fit(_small_mlp(), digits, epochs=1, progress=False, desc="silent-bar")
    assert "silent-bar" not in capsys.readouterr().err
