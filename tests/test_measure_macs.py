"""MAC counts checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.measure import MAC_RULES, count_macs


class MultiHeadSelfAttention(nn.Module):
    """Stand-in with the reference transformer's class name and attributes."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner) for _ in range(3))
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        mixed = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(b, t, -1))


class Recurrent(nn.Module):
    """``[B, T, F]`` -> the RNN's output sequence (fed time-major when the RNN wants it)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))[0]


class SelfAttn(nn.Module):
    """``[B, T, E]`` -> self-attention (fed time-major when the module wants it)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.mha.batch_first else x.transpose(0, 1)
        return self.mha(x, x, x)[0]


class Scale(nn.Module):
    """A weighted leaf no MAC rule knows."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def total(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs(model, x).total


def test_mlp() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    macs = count_macs(model, torch.randn(3, 10))
    assert macs.total == 10 * 20 + 20 * 5 == 300
    assert [(layer.name, layer.type, layer.macs) for layer in macs.layers] == [
        ("0", "Linear", 200), ("2", "Linear", 100)]
    assert macs.layers[0].params == 220


def test_linear_over_tokens() -> None:
    assert total(nn.Linear(4, 6), torch.randn(2, 7, 4)) == 7 * 4 * 6


def test_convolutions() -> None:
    assert total(nn.Conv1d(2, 4, kernel_size=3), torch.randn(2, 2, 10)) == 8 * 4 * 2 * 3
    depthwise = nn.Conv1d(4, 4, kernel_size=3, groups=4)
    assert total(depthwise, torch.randn(1, 4, 10)) == 8 * 4 * 1 * 3
    grouped = nn.Conv1d(4, 8, kernel_size=3, groups=2, padding=1)
    assert total(grouped, torch.randn(1, 4, 10)) == 10 * 8 * 2 * 3
    assert total(nn.Conv2d(1, 2, kernel_size=3), torch.randn(1, 1, 5, 5)) == 9 * 2 * 1 * 9
    strided = nn.Conv1d(1, 1, kernel_size=2, stride=2)
    assert total(strided, torch.randn(1, 1, 10)) == 5 * 2


def test_gru_lstm_rnn() -> None:
    gru = Recurrent(nn.GRU(1, 8, batch_first=True))
    assert total(gru, torch.randn(2, 40, 1)) == 40 * 3 * (1 * 8 + 8 * 8) == 8640
    lstm = Recurrent(nn.LSTM(1, 8))  # the LSTM itself sees time-major [T, B, F]
    assert total(lstm, torch.randn(2, 40, 1)) == 40 * 4 * (1 * 8 + 8 * 8)
    rnn = Recurrent(nn.RNN(3, 5, batch_first=True))
    assert total(rnn, torch.randn(1, 6, 3)) == 6 * (3 * 5 + 5 * 5)


@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
def test_stacked_bidirectional_and_projected_rnns() -> None:
    two_layer = Recurrent(nn.GRU(2, 8, num_layers=2, batch_first=True))
    per_step = 3 * (2 * 8 + 8 * 8) + 3 * (8 * 8 + 8 * 8)
    assert total(two_layer, torch.randn(2, 5, 2)) == 5 * per_step
    bidir = Recurrent(nn.GRU(1, 4, bidirectional=True, batch_first=True))
    assert total(bidir, torch.randn(1, 3, 1)) == 3 * 2 * 3 * (1 * 4 + 4 * 4)
    proj = Recurrent(nn.LSTM(2, 8, proj_size=3, batch_first=True))  # weight_hr: 8 -> 3
    assert total(proj, torch.randn(1, 4, 2)) == 4 * (4 * 8 * 2 + 4 * 8 * 3 + 8 * 3)


def test_self_attention_by_class_name() -> None:
    attn = MultiHeadSelfAttention(dim=8, num_heads=2, head_dim=4)
    macs = count_macs(attn, torch.randn(3, 5, 8))
    by_name = {layer.name: layer for layer in macs.layers}
    assert by_name["<model>"].macs == 2 * 2 * 5 * 5 * 4  # QK^T and AV
    assert by_name["<model>"].params == 0  # projections are their own entries
    assert by_name["q"].macs == 5 * 8 * 8
    assert macs.total == 4 * 5 * 8 * 8 + 2 * 2 * 5 * 5 * 4


@pytest.mark.parametrize("batch_first", [True, False])
def test_nn_multihead_attention(batch_first: bool) -> None:
    model = SelfAttn(nn.MultiheadAttention(8, 2, batch_first=batch_first))
    macs = count_macs(model, torch.randn(3, 5, 8))
    # q/k/v/out projections 4 x T x E x E; QK^T and AV 2 x T x T x E
    assert macs.total == 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8
    assert [layer.name for layer in macs.layers] == ["mha"]  # out_proj is not double-counted
    assert macs.layers[0].params == sum(p.numel() for p in model.parameters())


def test_nn_multihead_cross_attention_with_kdim_vdim() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory = torch.cat([x, x[:, :2]], dim=1)  # source length 7
            return self.mha(x, memory[..., :4], memory[..., :6])[0]

    # q 5x8x8, k 7x8x4, v 7x8x6, QK^T and AV 2x5x7x8, out 5x8x8
    expected = 5 * 64 + 7 * 32 + 7 * 48 + 2 * 5 * 7 * 8 + 5 * 64
    assert total(Cross(), torch.randn(2, 5, 8)) == expected


def test_reference_transformer_attention_entry() -> None:
    transformer = pytest.importorskip("nncompress.models.transformer")
    model = transformer.TinyTransformer((1, 40), 10, patch_size=4, dim=16, depth=1,
                                        num_heads=2, head_dim=8, mlp_dim=32)
    by_name = {layer.name: layer for layer in count_macs(model, torch.randn(2, 1, 40)).layers}
    assert by_name["blocks.0.attn"].type == "MultiHeadSelfAttention"
    assert by_name["blocks.0.attn"].macs == 2 * 2 * 10 * 10 * 8
    assert by_name["blocks.0.attn.q"].macs == 10 * 16 * 16


@pytest.mark.parametrize("model, shape", [
    (nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(32, 3)), (2, 10)),
    (Recurrent(nn.GRU(1, 8, num_layers=2, batch_first=True)), (7, 1)),
    (MultiHeadSelfAttention(8, 2, 4), (5, 8)),
    (SelfAttn(nn.MultiheadAttention(8, 2, batch_first=True)), (5, 8)),
    (SelfAttn(nn.MultiheadAttention(8, 2)), (5, 8)),
    (Recurrent(nn.LSTM(2, 4)), (6, 2)),
])
def test_per_sample_macs_do_not_depend_on_batch(model: nn.Module, shape: tuple[int, ...]) -> None:
    one = count_macs(model, torch.randn(1, *shape))
    many = count_macs(model, torch.randn(9, *shape))
    assert one == many
    assert one.total > 0


def test_sparse_macs_follow_weight_density() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:, :5] = 0.0  # half of the first weight is zero
    macs = count_macs(model, torch.randn(4, 10))
    first, second = macs.layers
    assert (first.macs, first.sparse_macs) == (200, 100)
    assert first.nonzero_params == 100 + 20  # plus the bias
    assert second.sparse_macs == second.macs == 100
    assert macs.sparse_total == 200


def test_shared_module_counts_every_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    macs = count_macs(Twice(), torch.randn(2, 4))
    assert macs.total == 2 * 16 and len(macs.layers) == 1


def test_unknown_weighted_leaf_raises_naming_it() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), Scale(3)))
    with pytest.raises(UnsupportedLayerError, match=r"'1\.1'.*Scale"):
        count_macs(model, torch.randn(1, 3))


def test_norms_count_zero_and_state_is_restored() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.ReLU(),
                          nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    stats = model[1].running_mean.clone()
    macs = count_macs(model, torch.randn(4, 1, 10))
    assert macs.total == 8 * 2 * 3 + 16 * 3
    assert [layer.type for layer in macs.layers] == ["Conv1d", "Linear"]
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)


def test_rules_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        MAC_RULES[nn.Identity] = MAC_RULES[nn.Linear]  # type: ignore[index]
