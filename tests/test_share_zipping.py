"""Multi-task zipping (MTZ, He, Zhou & Thiele 2018)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import tiny_data
from nncompress import models
from nncompress.data import class_subset
from nncompress.errors import RecipeError, UnsupportedLayerError
from nncompress.models import MLP
from nncompress.share.zipping import merge_cost, zip_models
from nncompress.train import fit


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_merge_cost_is_the_minimum_of_both_quadratic_errors() -> None:
    d = 5
    h_a, h_b = _spd(d, 0), _spd(d, 1)
    g = torch.Generator().manual_seed(2)
    w_a = torch.randn(3, d, generator=g, dtype=torch.float64)
    w_b = torch.randn(4, d, generator=g, dtype=torch.float64)
    cost, s_inv = merge_cost(h_a, h_b, w_a, w_b)
    assert cost.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            a, b = w_a[i], w_b[j]
            # the minimiser of 1/2 (w-a)' H_A (w-a) + 1/2 (w-b)' H_B (w-b), solved directly
            w = torch.linalg.solve(h_a + h_b, h_a @ a + h_b @ b)
            value = 0.5 * (w - a) @ h_a @ (w - a) + 0.5 * (w - b) @ h_b @ (w - b)
            assert cost[i, j] == pytest.approx(float(value), rel=1e-9, abs=1e-12)
            assert torch.allclose(s_inv @ (h_a @ a + h_b @ b), w)
            # and it is a minimum: any step away costs more
            step = 1e-3 * torch.randn(d, generator=g, dtype=torch.float64)
            moved = w + step
            worse = 0.5 * (moved - a) @ h_a @ (moved - a) + 0.5 * (moved - b) @ h_b @ (
                moved - b)
            assert worse > value


def test_identical_vectors_merge_for_free() -> None:
    h_a, h_b = _spd(4, 3), _spd(4, 4)
    w = torch.randn(2, 4, dtype=torch.float64)
    cost, _ = merge_cost(h_a, h_b, w, w)
    assert cost[0, 0] == pytest.approx(0.0, abs=1e-9)
    assert cost[1, 1] == pytest.approx(0.0, abs=1e-9)
    assert cost[0, 1] > 1e-6


def _trained_pair(build, features: int, epochs: int, seed: int = 0):
    """Two models from ``build()`` trained on classes 0-1 and 2-3 of one tiny dataset."""
    data = tiny_data(n=192, features=features, classes=4, seed=seed)
    data_a = class_subset(data, [0, 1], seed=seed)
    data_b = class_subset(data, [2, 3], seed=seed)
    torch.manual_seed(seed)
    model_a, model_b = build(), build()
    fit(model_a, data_a, epochs=epochs, lr=1e-2, progress=False)
    fit(model_b, data_b, epochs=epochs, lr=1e-2, progress=False, seed=1)
    return model_a.eval(), model_b.eval(), data_a, data_b


def _pair(hidden: tuple[int, ...] = (16, 8)):
    return _trained_pair(lambda: MLP((1, 12), 2, hidden=hidden), 12, 15)


def _conv_pair():
    return _trained_pair(
        lambda: models.build("cnn1d", (1, 16), 2, channels=[6, 8], kernel_size=3), 16, 8)


@pytest.mark.parametrize("make, features, shared", [
    (_pair, 12, ((0, 16, 16), (0, 8, 8))),
    (_conv_pair, 16, ((0, 6, 6), (0, 8, 8))),  # BatchNorms folded first
])
def test_sharing_nothing_keeps_both_models_exactly(make, features, shared) -> None:
    model_a, model_b, data_a, data_b = make()
    result = zip_models(model_a, model_b, data_a, data_b, share=0.0, retrain_epochs=0,
                        final_epochs=0)
    x = torch.randn(7, 1, features)
    with torch.no_grad():
        ya, yb = result.model(x)
        for got, model in ((result.model.task(0)(x), model_a), (ya, model_a),
                           (result.model.task(1)(x), model_b), (yb, model_b)):
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)
    assert result.params_after <= result.params_before
    assert result.merge_error == (0.0, 0.0)
    assert result.shared == shared
    assert not any(isinstance(m, nn.BatchNorm1d) for m in result.model.modules())


def test_a_model_zipped_with_itself_shares_everything_at_no_cost() -> None:
    model_a, _, data_a, _ = _pair()
    twin = copy.deepcopy(model_a)
    result = zip_models(model_a, twin, data_a, data_a, share=1.0, retrain_epochs=0,
                        final_epochs=0)
    x = torch.randn(5, 1, 12)
    with torch.no_grad():
        assert torch.allclose(result.model.task(0)(x), model_a(x), atol=1e-4)
        assert torch.allclose(result.model.task(1)(x), model_a(x), atol=1e-4)
    # both hidden layers fully shared: one copy of them plus the two output layers
    hidden = 12 * 16 + 16 + 16 * 8 + 8
    head = 8 * 2 + 2
    assert result.params_after == hidden + 2 * head
    assert result.params_before == 2 * (hidden + head)
    assert result.macs_after < result.macs_before
    assert all(e == pytest.approx(0.0, abs=1e-6) for e in result.merge_error)


def test_partial_zip_counts_and_retraining_recovers() -> None:
    model_a, model_b, data_a, data_b = _pair()
    result = zip_models(model_a, model_b, data_a, data_b, share=[0.5, 0.5],
                        retrain_epochs=2, final_epochs=4, lr=1e-2)
    assert result.shared == ((8, 16, 16), (4, 8, 8))
    layer0, layer1 = result.model.layers
    assert layer0.shared.weight.shape == (8, 12)  # reads the shared input only
    assert layer0.only_a.weight.shape == (8, 12)
    # layer 1: shared reads [s, a, b] = 8 + 8 + 8; A-only reads [s, a]
    assert layer1.shared.weight.shape == (4, 24)
    assert layer1.only_a.weight.shape == (4, 16)
    assert layer1.only_b.weight.shape == (4, 16)
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.params_after < result.params_before
    assert len(result.accuracy_merged) == 2
    for before, after in zip(result.accuracy_before, result.accuracy_after, strict=True):
        assert after >= before - 0.15
    # the inputs were not touched
    assert all(isinstance(m, nn.Linear) for m in model_a.layers if list(m.parameters()))


def test_zipping_is_deterministic() -> None:
    model_a, model_b, data_a, data_b = _pair()
    runs = [zip_models(model_a, model_b, data_a, data_b, share=0.75, retrain_epochs=1,
                       final_epochs=1) for _ in range(2)]
    x = torch.randn(4, 1, 12)
    with torch.no_grad():
        assert torch.equal(runs[0].model(x)[0], runs[1].model(x)[0])
    assert runs[0].accuracy_after == runs[1].accuracy_after


def test_hessian_merge_raises_the_layer_error_less_than_averaging() -> None:
    """MTZ minimises the increase of both tasks' layer-wise errors; pairing by Euclidean
    distance and averaging (the ablation) raises it more, measured with the same data."""
    model_a, model_b, data_a, data_b = _pair(hidden=(16,))
    kw = dict(share=1.0, retrain_epochs=0, final_epochs=0)
    hess = zip_models(model_a, model_b, data_a, data_b, **kw)
    eucl = zip_models(model_a, model_b, data_a, data_b, criterion="euclidean", **kw)
    assert 0 < hess.merge_error[0] < eucl.merge_error[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(share=1.5), "share"),
    (dict(share=[0.5, 0.5, 0.5]), "hidden layer"),
    (dict(share=[]), "share"),
    (dict(share=0.5, criterion="cosine"), "criterion"),
    (dict(share=0.5, final_epochs=-1), "final_epochs"),
    (dict(share=0.5, damping=0.0), "damping"),
])
def test_bad_settings_are_refused(kwargs, match) -> None:
    model_a, model_b, data_a, data_b = _pair()
    with pytest.raises(RecipeError, match=match):
        zip_models(model_a, model_b, data_a, data_b, **kwargs)


def test_models_that_are_not_plain_chains_are_refused() -> None:
    data = tiny_data(n=64, features=12, classes=2)
    mlp = MLP((1, 12), 2)
    grouped = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=2),
                            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 2))
    with pytest.raises(UnsupportedLayerError, match="model A has grouped convolution"):
        zip_models(grouped, mlp, data, data, share=0.5)
    gru = models.build("gru", (1, 12), 2)
    with pytest.raises(UnsupportedLayerError, match="GRU"):
        zip_models(mlp, gru, data, data, share=0.5)

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))) * 2)

    with pytest.raises(UnsupportedLayerError, match="chain"):
        zip_models(Skip(), mlp, data, data, share=0.5)
    k3 = models.build("cnn1d", (1, 12), 2, channels=[4, 8], kernel_size=3)
    k5 = models.build("cnn1d", (1, 12), 2, channels=[4, 8], kernel_size=5)
    with pytest.raises(UnsupportedLayerError, match="layer 1 differs"):
        zip_models(k3, k5, data, data, share=0.5)
    with pytest.raises(UnsupportedLayerError, match="prepare their input differently"):
        zip_models(k3, MLP((1, 12), 2, hidden=(8, 8)), data, data, share=0.5)


def test_conv_twin_zips_for_free_even_when_partly_shared() -> None:
    """Sharing half the filters reorders the next layer's input channels (and the
    classifier's blocks after pooling); a model zipped with itself must keep its
    outputs exactly, which checks every reordering."""
    model_a, _, data_a, _ = _conv_pair()
    twin = copy.deepcopy(model_a)
    result = zip_models(model_a, twin, data_a, data_a, share=[0.5, 0.5], retrain_epochs=0,
                        final_epochs=0)
    x = torch.randn(5, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model.task(0)(x), model_a(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.model.task(1)(x), model_a(x), atol=1e-4, rtol=1e-4)
    assert result.shared == ((3, 6, 6), (4, 8, 8))
    # layer 1 reads the shared input: identical filters merge at zero cost; layer 2's twins
    # read copies of the same signal in different places ([s, a] vs [s, b]), so the cost
    # left is only what the damping term sees
    assert result.merge_error[0] == pytest.approx(0.0, abs=1e-9)
    assert result.merge_error[1] < 1e-2
    assert result.params_after < result.params_before


def test_flattened_conv_feeding_a_linear_is_reordered_in_blocks() -> None:
    torch.manual_seed(0)
    data = tiny_data(n=96, features=10, classes=2)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 10, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    result = zip_models(model, copy.deepcopy(model), data, data, share=[0.5, 0.5],
                        retrain_epochs=0, final_epochs=0)
    x = torch.randn(3, 1, 10)
    with torch.no_grad():
        torch.testing.assert_close(result.model.task(0)(x), model(x), atol=1e-4, rtol=1e-4)
    assert result.model.layers[1].shared.weight.shape == (3, 60)  # [s, a, b]: 6 x 10


def test_tasks_must_share_an_input() -> None:
    small, other = tiny_data(features=12), tiny_data(features=10)
    with pytest.raises(RecipeError, match="share an input"):
        zip_models(MLP((1, 12), 3), MLP((1, 10), 3), small, other, share=0.5)


def _saved_zip(make, tmp_path):
    """(zip result, task A data, path of the saved zipped model)."""
    import nncompress as nc

    model_a, model_b, data_a, data_b = make()
    result = zip_models(model_a, model_b, data_a, data_b, share=0.5, retrain_epochs=0,
                        final_epochs=1)
    path = tmp_path / "zipped.nnc"
    nc.save(result.model, path)
    return result, data_a, path


@pytest.mark.parametrize("make", [_pair, _conv_pair])
def test_zipped_models_save_and_load_without_a_skeleton(make, tmp_path) -> None:
    import nncompress as nc

    result, data_a, path = _saved_zip(make, tmp_path)
    back = nc.load(path)  # no skeleton: the architecture record rebuilds the pair
    x = next(iter(data_a.test))[0]
    with torch.no_grad():
        for got, want in zip(back(x), result.model(x), strict=True):
            assert torch.equal(got, want)


def test_operations_without_a_file_record_are_refused_before_zipping() -> None:
    data = tiny_data(n=64, features=12, classes=2)
    odd = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softplus(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError, match="Softplus has no file record"):
        zip_models(odd, copy.deepcopy(odd), data, data, share=0.5)


@pytest.mark.parametrize("mutate", [
    lambda c: c["layers"][0].__setitem__("shared", {"type": "os.system", "args": {}}),
    lambda c: c["layers"][0]["activation"].append({"type": "Dropout", "args": {"p": 9}}),
    lambda c: c.__setitem__("layers", "not a list"),
    lambda c: c.__setitem__("extra", 1),
    lambda c: c["tail_a"][0]["args"].__setitem__("out_features", 10**9),
], ids=["unknown type", "bad arg", "bad structure", "unexpected key", "oversized layer"])
def test_a_hostile_zipped_config_gives_one_line_format_error(mutate, tmp_path) -> None:
    from nncompress import formats
    from nncompress.errors import FormatError
    from test_formats_corrupt import resign, split

    _, _, path = _saved_zip(_pair, tmp_path)
    _, header, payload = split(path.read_bytes())
    mutate(header["arch"]["builder"]["config"])
    resign(path, payload, header=header)  # a valid checksum: only the config is hostile
    with pytest.raises(FormatError, match=r"zipped_pair|tail_a") as info:
        formats.load(path)
    assert "\n" not in str(info.value)
