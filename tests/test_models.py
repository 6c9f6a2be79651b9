"""Reference models: build, forward, arch_config round trip, pruned widths, registry, load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nncompress import models
from nncompress.data import Dataset
from nncompress.errors import ModelError
from nncompress.models import ARCHITECTURES, ArchModule, ModelSpec

SHAPES = {"mnist1d": (1, 40), "digits": (1, 8, 8)}
# Tiny widths per model, so every test builds in milliseconds.
TINY: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [16, 8]},
    "cnn1d": {"channels": [4, 8, 8]},
    "gru": {"hidden": 8},
    "lstm": {"hidden": [8, 6]},
    "cnn2d": {"channels": [3, 4], "hidden": [12, 10]},
    "rescnn": {"channels": 4, "hidden": [8, 6]},
    "transformer": {"dim": 8, "num_heads": 2, "head_dim": 4, "mlp_dim": 16},
}
ALL = ("cnn1d", "cnn2d", "gru", "lstm", "mlp", "rescnn", "transformer")


def _tiny(name: str, num_classes: int = 10) -> ArchModule:
    torch.manual_seed(0)
    shape = SHAPES[models.spec(name).default_dataset]
    return models.build(name, shape, num_classes, **TINY[name])


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_names_registry_and_specs() -> None:
    assert models.model_names() == ALL
    for name in ALL:
        spec = models.spec(name)
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert ARCHITECTURES.get(spec.cls.arch_name) is spec.cls
        assert spec.default_dataset in SHAPES
        assert spec.epochs >= 1 and 0 < spec.lr < 1 and spec.description
    assert models.spec("mlp").default_dataset == "digits"
    assert models.spec("cnn2d").default_dataset == "digits"


@pytest.mark.parametrize("name", ALL)
def test_default_model_forward_on_its_dataset_shape(name: str) -> None:
    shape = SHAPES[models.spec(name).default_dataset]
    model = models.build(name, shape, 10)
    assert isinstance(model, ArchModule) and model.arch_name == name
    out = model.eval()(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_arch_config_rebuilds_same_architecture(name: str) -> None:
    model = _tiny(name, num_classes=7)
    config = model.arch_config()
    assert json.loads(json.dumps(config)) == config  # JSON-able
    rebuilt = type(model)(**config)
    assert _shapes(rebuilt) == _shapes(model)
    assert rebuilt.arch_config() == config
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, *SHAPES[models.spec(name).default_dataset])
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x))


def test_mlp_is_lenet_300_100() -> None:
    model = models.build("mlp", (1, 8, 8), 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 300), (300, 100),
                                                                  (100, 10)]


def test_recurrent_defaults_two_layers_and_lstm_forget_bias() -> None:
    gru = models.build("gru", (1, 40), 10)
    assert [type(r) for r in gru.layers] == [nn.GRU, nn.GRU]
    assert all(r.batch_first for r in gru.layers)
    lstm = models.build("lstm", (1, 40), 10, hidden=32, num_layers=3)
    assert lstm.arch_config()["hidden"] == [32, 32, 32]
    forget = lstm.layers[0].bias_ih_l0[32:64] + lstm.layers[0].bias_hh_l0[32:64]
    assert torch.equal(forget, torch.ones(32))


def test_transformer_attention_module_and_heads() -> None:
    model = models.build("transformer", (1, 40), 10)
    attn = [m for m in model.modules() if isinstance(m, models.MultiHeadSelfAttention)]
    assert len(attn) == 2
    assert (attn[0].num_heads, attn[0].head_dim) == (4, 16)
    assert model.pos_embedding.shape == (1, 10, 64)  # 40 samples / patch 4 = 10 tokens


def test_transformer_exports_without_graph_breaks() -> None:
    model = _tiny("transformer").eval()
    x = torch.randn(2, 1, 40)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-6)


def _narrow_linear(old: nn.Linear, keep_out: int | None = None,
                   keep_in: int | None = None) -> nn.Linear:
    """What a structural pruner does: a smaller Linear holding a slice of the old weights."""
    out_f = keep_out or old.out_features
    in_f = keep_in or old.in_features
    new = nn.Linear(in_f, out_f)
    with torch.no_grad():
        new.weight.copy_(old.weight[:out_f, :in_f])
        new.bias.copy_(old.bias[:out_f])
    return new


def test_pruned_mlp_runs_and_reports_new_widths() -> None:
    model = _tiny("mlp")
    model.layers.fc1 = _narrow_linear(model.layers.fc1, keep_out=5)
    model.layers.fc2 = _narrow_linear(model.layers.fc2, keep_in=5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.arch_config()["hidden"] == [5, 8]
    assert _shapes(type(model)(**model.arch_config())) == _shapes(model)


def test_pruned_cnn1d_runs_and_reports_new_widths() -> None:
    model = _tiny("cnn1d")
    feats = model.features
    feats.conv2 = nn.Conv1d(4, 3, 5, stride=2, padding=2, bias=False)
    feats.bn2 = nn.BatchNorm1d(3)
    feats.conv3 = nn.Conv1d(3, 8, 5, stride=2, padding=2, bias=False)
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert model.arch_config()["channels"] == [4, 3, 8]
    assert _shapes(type(model)(**model.arch_config())) == _shapes(model)


def test_transformer_with_a_pruned_head_runs() -> None:
    model = _tiny("transformer")
    attn = model.blocks[0].attn  # 2 heads of 4: keep the first head only
    attn.q, attn.k, attn.v = (_narrow_linear(m, keep_out=4) for m in (attn.q, attn.k, attn.v))
    attn.out = _narrow_linear(attn.out, keep_in=4)
    assert attn.num_heads == 1
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert model.arch_config()["num_heads"] == [1, 2]
    assert _shapes(type(model)(**model.arch_config())) == _shapes(model)


def test_recurrent_per_layer_widths() -> None:
    model = _tiny("lstm")
    assert [r.hidden_size for r in model.layers] == [8, 6]
    assert model.layers[1].input_size == 8
    assert model.classifier.in_features == 6


def test_rescnn_blocks_are_depthwise_separable_residuals() -> None:
    model = _tiny("rescnn")
    block = model.blocks[0]
    assert isinstance(block, models.InvertedResidual1d)
    assert block.depthwise.groups == block.depthwise.in_channels == 8
    assert block.expand.kernel_size == (1,) and block.project.kernel_size == (1,)
    x = torch.randn(2, 4, 20)
    assert block(x).shape == x.shape


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError, match=r"'resnet50'.*cnn1d.*transformer"):
        models.build("resnet50", (1, 40), 10)
    with pytest.raises(ModelError, match="resnet50"):
        models.spec("resnet50")


def test_bad_options_raise_model_error() -> None:
    with pytest.raises(ModelError, match=r"'mlp' has no option 'width'"):
        models.build("mlp", (1, 40), 10, width=3)
    with pytest.raises(ModelError, match="channels"):
        models.build("cnn1d", (1, 40), 10, channels=[8, 0])
    with pytest.raises(ModelError, match="num_classes"):
        models.build("cnn1d", (1, 40), 1)
    with pytest.raises(ModelError, match="patch_size"):
        models.build("transformer", (1, 42), 10)
    with pytest.raises(ModelError, match=r"'cnn2d' needs inputs shaped"):
        models.build("cnn2d", (1, 40), 10)
    with pytest.raises(ModelError, match="3 widths but 2 layers"):
        models.build("gru", (1, 40), 10, hidden=[4, 4, 4], num_layers=2)


def test_load_rejects_unknown_model_and_mismatched_data(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*mlp"):
        models.load("nope")
    with pytest.raises(ModelError, match=r"'cnn2d'.*'mnist1d'|'mnist1d'.*'cnn2d'"):
        models.load("cnn2d", "mnist1d", progress=False)
    with pytest.raises(ModelError, match=r"'gru'.*'digits'"):
        models.load("gru", "digits", progress=False)


def test_load_trains_on_a_given_dataset_without_caching(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 4, generator=generator)
    y = (x.sum(dim=(1, 2)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    toy = Dataset("toy", loader, loader, (2, 4), 2)
    model, data = models.load("mlp", toy, epochs=1, progress=False)
    assert data is toy
    assert model(x).shape == (64, 2)
    assert not (tmp_path / "models").exists()


def _formats_ready() -> bool:
    try:
        from nncompress import formats
    except ImportError:
        return False
    return callable(getattr(formats, "save", None)) and callable(getattr(formats, "load", None))


@pytest.mark.skipif(not _formats_ready(), reason="nncompress.formats not available yet")
def test_load_trains_once_then_uses_cache(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path))
    model, data = models.load("mlp", epochs=1, progress=False)
    assert data.name == "digits" and not model.training
    files = list((tmp_path / "models").glob("mlp-digits-s0-e1-*.nnc"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    cached, _ = models.load("mlp", epochs=1, progress=False)
    assert files[0].stat().st_mtime_ns == stamp  # not rewritten
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(cached(x), model(x))
    retrained, _ = models.load("mlp", epochs=1, progress=False, retrain=True)
    assert torch.equal(retrained(x), model(x))  # same seed, same weights
    other_seed, _ = models.load("mlp", epochs=1, progress=False, seed=1)
    assert not torch.equal(other_seed(x), model(x))
    assert len(list((tmp_path / "models").glob("*.nnc"))) == 2
