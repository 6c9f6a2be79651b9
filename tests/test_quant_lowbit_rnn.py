"""Low-bit weight matrices of nn.GRU / nn.LSTM / nn.RNN (quant/lowbit_rnn.py, the lowbit
technique's recurrent layers): the training form, the frozen plain layer on its grid, the
bytes the container then stores, and the technique on recurrent models (which it once
left float, 1.01x)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from helpers import tiny_data
from nncompress import models
from nncompress.data import Dataset
from nncompress.quant.lowbit import LowBitConfig, lowbit
from nncompress.quant.lowbit_rnn import freeze, to_training, weight_names
from nncompress.technique import Context
from test_prune_structured_general import BiGRU


def layers() -> list[nn.RNNBase]:
    torch.manual_seed(0)
    return [nn.GRU(3, 8, num_layers=2, batch_first=True),
            nn.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
            nn.RNN(3, 8, nonlinearity="relu", batch_first=True)]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("quantizer", ["linear", "log"])
def test_training_form_trains_and_freezes_to_the_plain_layer_on_its_grid(
        case: int, quantizer: str) -> None:
    layer = layers()[case]
    base, names = type(layer), [n for n, _ in layers()[case].named_parameters()]
    x = torch.randn(4, 5, 3)
    to_training(layer, weight_bits=3, quantizer=quantizer)
    assert [n for n, _ in layer.named_parameters() if "weight_quant" not in n] == names
    layer.train()
    layer(x)[0].sum().backward()
    for name in weight_names(layer):
        assert getattr(layer, name).grad is not None
        assert layer.weight_quant[name].step.grad is not None
    layer.eval()
    with torch.no_grad():
        trained = layer(x)[0]
    freeze(layer)
    assert type(layer) is base and not hasattr(layer, "weight_quant")
    assert [n for n, _ in layer.named_parameters()] == names
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], trained)
    for name in weight_names(layer):  # signed 3-bit grid: at most 2**3 - 1 values
        assert torch.unique(getattr(layer, name)).numel() <= 7, name


def test_lowbit_on_a_reference_gru_shrinks_the_file_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = tiny_data(n=128, features=12)
    model = models.build("gru", (1, 12), 3, hidden=32)
    nc.fit(model, data, epochs=2, lr=1e-2, progress=False)
    before = nc.save(model, tmp_path / "float.nnc")
    ctx = Context(data, progress=False)
    out = lowbit(copy.deepcopy(model), LowBitConfig(weight_bits=4, epochs=1,
                                                    bits={"layers.1": 3}), ctx)
    log = "\n".join(ctx.log)
    assert "lowbit: layers.0: 4-bit linear weight matrices (GRU" in log
    assert "lowbit: layers.1: 3-bit linear weight matrices (GRU" in log
    assert all(type(m) is nn.GRU for m in out.layers)
    after = nc.save(out, tmp_path / "lowbit.nnc")
    assert after < before / 5  # 4 / 3-bit matrices, the classifier at 8 bits
    loaded = nc.load(tmp_path / "lowbit.nnc")
    x = torch.randn(5, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), out(x))


def test_lowbit_on_a_users_bidirectional_gru_over_token_ids() -> None:
    """Embedding stays float (named), the bidirectional GRU goes low-bit, head at 8 bits."""

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (64, 7))

    ds = TensorDataset(ids, ids[:, 0] % 5)
    data = Dataset("ids", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32),
                   (7,), 5)
    ctx = Context(data, progress=False)
    out = lowbit(BiGRU(), LowBitConfig(weight_bits=4, epochs=1), ctx)
    log = "\n".join(ctx.log)
    assert "stays float (embedding table): emb" in log
    assert "lowbit: rnn: 4-bit linear weight matrices (GRU" in log
    assert torch.unique(out.rnn.weight_hh_l1_reverse).numel() <= 15
    assert out(ids[:3]).shape == (3, 5)


def test_recurrent_false_keeps_the_matrices_float_as_mixed_precision_does() -> None:
    from nncompress.quant.mixed import MixedPrecisionConfig, lowbit_config

    assert lowbit_config(MixedPrecisionConfig(average_bits=4.0), {}, 0).recurrent is False
    torch.manual_seed(0)
    model = models.build("gru", (1, 12), 3, hidden=16)
    ctx = Context(tiny_data(features=12), progress=False)
    out = lowbit(copy.deepcopy(model), LowBitConfig(epochs=0, recurrent=False), ctx)
    assert "stays float (recurrent layer: excluded, recurrent: false" in "\n".join(ctx.log)
    assert torch.equal(out.layers[0].weight_hh_l0, model.layers[0].weight_hh_l0)
