"""weight_sharing (Han, Mao & Dally 2015): shared weights are centroids, pruned zeros stay,
each centroid's gradient is the sum of its members', the deep-compression recipe runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import api, formats, models
from nncompress.errors import RecipeError
from nncompress.prune.magnitude import magnitude_masks
from nncompress.recipe import Recipe, Stage
from nncompress.report import breakdown_cells
from nncompress.share import weight_sharing as ws_module
from nncompress.share.weight_sharing import (
    CentroidModel,
    SharedWeight,
    WeightSharingConfig,
    cluster_weight,
    weight_sharing,
    zero_small_centroids,
)
from nncompress.technique import TECHNIQUES, Context


def conv_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(80, 3))


def pruned_ctx(model: nn.Module, sparsity: float = 0.5) -> Context:
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    ctx.masks.update(magnitude_masks(model, sparsity))
    return ctx


def nonzero_values(w: torch.Tensor) -> set[float]:
    return set(w[w != 0].tolist())


def test_shared_weights_equal_their_centroids_and_zeros_stay() -> None:
    model = conv_linear()
    ctx = pruned_ctx(model)
    masks = {n: m.clone() for n, m in ctx.masks.items()}
    weight_sharing(model, WeightSharingConfig(conv_bits=3, linear_bits=2), ctx)
    conv, lin = model[0].weight.detach(), model[3].weight.detach()
    assert len(nonzero_values(conv)) <= 8 and len(nonzero_values(lin)) <= 4
    assert len(nonzero_values(lin)) >= 2                       # really clustered, not collapsed
    for name, w in (("0.weight", conv), ("3.weight", lin)):
        assert torch.all(w[~masks[name]] == 0)                  # pruned stay pruned
        assert torch.all(w[masks[name]] != 0)                   # zero is no cluster
        assert torch.equal(ctx.masks[name], masks[name])
    assert any("3.weight" in line and "distinct" in line for line in ctx.log)


def test_cluster_weight_assigns_each_weight_its_nearest_centroid() -> None:
    w = torch.tensor([[0.1, 0.12, 0.0], [-0.5, -0.52, 0.9]])
    sw = cluster_weight(w, torch.ones(2, 3, dtype=torch.bool), 2)
    assert sw.centroids.numel() == 4 and not bool(sw.keep[0, 2])
    assert torch.equal(sw.weight(), torch.where(sw.keep, sw.centroids[sw.index], 0.0))
    assert torch.allclose(sw.weight(), torch.tensor([[0.11, 0.11, 0.0], [-0.51, -0.51, 0.9]]))


def test_centroid_gradient_is_the_sum_of_member_gradients() -> None:
    lin = nn.Linear(3, 2, bias=False)
    index = torch.tensor([[0, 1, 0], [1, 1, 2]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    sw = SharedWeight(torch.tensor([0.5, -1.0, 2.0]), index, keep)
    wrapper = CentroidModel(lin, {"weight": sw})
    x = torch.tensor([[1.0, 2.0, 3.0]])
    wrapper(x).sum().backward()
    # dL/dW_ij = x_j for both rows; C0 gets W00 + W02 = 1 + 3, C1 gets W01 + W10 + W11 =
    # 2 + 1 + 2, C2's only member (W12) is pruned, so 0.
    grad = wrapper.centroids[0].grad
    assert grad is not None and grad.tolist() == [4.0, 5.0, 0.0]
    assert lin.weight.grad is None                              # the weight itself is not trained


def test_centroid_fine_tuning_moves_centroids_not_the_structure() -> None:
    model = models.build("mlp", (1, 12), 3, hidden=(32,))
    ctx = pruned_ctx(model, 0.6)
    weight_sharing(model, WeightSharingConfig(bits=3), ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weight_sharing(model, WeightSharingConfig(bits=3, epochs=2, lr=1e-2), ctx)
    for name, p in model.named_parameters():
        if name in ctx.masks:
            w = p.detach()
            assert not torch.equal(w, before[name])
            assert torch.equal(w == 0, before[name] == 0)       # same zeros
            assert len(nonzero_values(w)) <= 8
            # Members move together: equal before -> equal after.
            for v in nonzero_values(before[name]):
                assert len(nonzero_values(w[before[name] == v])) == 1
    assert all(p.requires_grad for p in model.parameters())


def test_bits_per_layer_type_and_recurrent_layers() -> None:
    model = models.build("gru", (1, 12), 3, hidden=8)
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    x = torch.randn(4, 1, 12)
    model.train(False)
    with torch.no_grad():
        ref = model(x)
    weight_sharing(model, WeightSharingConfig(rnn_bits=4, linear_bits=1, epochs=1, lr=1e-3),
                   ctx)
    for name, p in model.named_parameters():
        if name.endswith("weight") or "weight_" in name:
            limit = 2 if isinstance(model.get_submodule(name.rpartition(".")[0]),
                                    nn.Linear) else 16
            assert len(nonzero_values(p.detach())) <= limit, name
    with torch.no_grad():
        assert model(x).shape == ref.shape


def test_optimal_method_and_config_validation(monkeypatch) -> None:
    model = conv_linear()
    ctx = pruned_ctx(model, 0.9)
    weight_sharing(model, WeightSharingConfig(bits=2, method="optimal"), ctx)
    assert len(nonzero_values(model[3].weight.detach())) == 4
    assert not any("used Lloyd" in line for line in ctx.log)
    monkeypatch.setattr(ws_module, "OPTIMAL_MAX_WORK", 10)   # too large: Lloyd, noted
    weight_sharing(conv_linear(), WeightSharingConfig(bits=2, method="optimal"), ctx)
    assert any("3.weight" in line and "used Lloyd" in line for line in ctx.log)
    assert TECHNIQUES.get("weight_sharing").category == "sparse-representation"
    with pytest.raises(RecipeError, match="bits"):
        Recipe("bad", [Stage.technique("weight_sharing", bits=0)])
    with pytest.raises(RecipeError, match="init"):
        Recipe("bad", [Stage.technique("weight_sharing", init="kmeans++")])


def test_deep_compression_recipe_end_to_end(tmp_path: Path) -> None:
    recipe = Recipe.named("deep-compression")
    assert [s.name for s in recipe.stages][-2:] == ["weight_sharing", "dead_units"]
    model = models.build("mlp", (1, 12), 3, hidden=(32,))
    result = api.compress(model, recipe, tiny_data(), progress=False, measure_latency=False)
    out = result.model
    path = tmp_path / "m.nnc"
    nc.save(out, path)
    back = nc.load(path)
    for (name, p), (_, q) in zip(out.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(p, q)
        if p.dim() == 2:
            assert len(nonzero_values(p.detach())) <= 32, name
            assert float((p == 0).float().mean()) > 0.5, name
    assert result.final.accuracy >= 0.6
    # the per-stage bytes table: one row per weight tensor and a total, every stage column
    headers, rows = breakdown_cells(result)
    assert headers[3] == "baseline" and headers[-2] == "+ Huffman"
    assert [h for h in headers if h.startswith("after ")] == [
        f"after {s.name}" for s in recipe.stages if s.kind == "technique"]
    weights = [n for n, p in out.named_parameters() if p.dim() >= 2]
    assert [r[0] for r in rows] == [*weights, "total"]
    final = {t.name: t for t in result.final.weights}
    base = {t.name: t for t in result.baseline.weights}
    for name in weights:
        t = final[name]
        assert t.coded <= t.plain  # Huffman allowed can only help
        assert t.nonzero == int((dict(out.named_parameters())[name] != 0).sum())
        assert base[name].plain == base[name].numel * 4  # the dense baseline is stored dense
    assert sum(t.plain for t in result.baseline.weights) > 10 * sum(
        t.coded for t in result.final.weights)
    assert "total" in result.bytes_table()


def test_near_zero_centroids_become_zeros_and_stay_pruned() -> None:
    # hand-made weight: members of a centroid at 0.001 (0.1 % of max |w|) and of larger ones
    w = torch.tensor([[0.001, 0.0011, 0.0009, 1.0], [-0.5, 0.5, 0.001, 0.0]])
    keep = w != 0
    sw = cluster_weight(w, keep, bits=2)
    same, dropped = zero_small_centroids(sw, 0.0)
    assert dropped == 0 and torch.equal(same.keep, sw.keep)
    small, dropped = zero_small_centroids(sw, 0.01)
    assert dropped == 4
    assert torch.equal(small.weight() == 0, (w == 0) | (w.abs() < 0.01))
    assert torch.equal(small.weight()[w.abs() > 0.1], sw.weight()[w.abs() > 0.1])
    # through the technique: the pruned members stay zero through centroid fine-tuning
    model = conv_linear()
    with torch.no_grad():
        model[3].weight[:, :40] = 1e-4
    ctx = Context(data=tiny_data(features=12), seed=0, progress=False)
    weight_sharing(model, WeightSharingConfig(bits=3, zero_below=0.01, epochs=2, lr=1e-2),
                   ctx)
    assert torch.all(model[3].weight[:, :40] == 0)
    assert not ctx.masks["3.weight"][:, :40].any()
    assert any("set to zero" in line for line in ctx.log)
    with pytest.raises(RecipeError, match="zero_below"):
        Recipe("bad", [Stage.technique("weight_sharing", zero_below=1.5)])


def test_per_gate_codebooks_cluster_each_gate_block_apart(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("gru", (1, 12), 3, hidden=8)
    with torch.no_grad():                       # gates on different scales
        for rnn in model.layers:
            for w in (rnn.weight_ih_l0, rnn.weight_hh_l0):
                w[8:16] *= 10.0
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    weight_sharing(model, WeightSharingConfig(rnn_bits=2, rnn_codebooks="gate"), ctx)
    for rnn in model.layers:
        w = rnn.weight_hh_l0.detach()
        blocks = [nonzero_values(w[i * 8:(i + 1) * 8]) for i in range(3)]   # r, z, n
        assert all(1 <= len(b) <= 4 for b in blocks)
        assert len(nonzero_values(w)) > 4           # more than one 2-bit codebook in all
        assert max(abs(v) for v in blocks[1]) > 5 * max(abs(v) for v in blocks[0])
    assert any("layers.0.weight_hh_l0" in line and "per gate (r/z/n)" in line
               and "up to 12 distinct" in line for line in ctx.log)
    # the tensor-wide default on the same weights: at most 4 values per tensor
    tensor_wide = models.build("gru", (1, 12), 3, hidden=8)
    weight_sharing(tensor_wide, WeightSharingConfig(rnn_bits=2), ctx)
    assert len(nonzero_values(tensor_wide.layers[0].weight_hh_l0.detach())) <= 4
    nc.save(model, tmp_path / "gates.nnc")
    x = torch.randn(3, 1, 12)
    assert torch.equal(nc.load(tmp_path / "gates.nnc")(x), model.eval()(x))


def test_per_gate_centroid_fine_tuning_keeps_each_gate_codebook() -> None:
    model = models.build("lstm", (1, 12), 3, hidden=8)
    ctx = Context(data=tiny_data(), seed=0, progress=False)
    weight_sharing(model, WeightSharingConfig(rnn_bits=1, rnn_codebooks="gate", epochs=2,
                                              lr=1e-2), ctx)
    w = model.layers[0].weight_hh_l0.detach()
    assert all(len(nonzero_values(w[i * 8:(i + 1) * 8])) <= 2 for i in range(4))  # i f g o
    assert len(nonzero_values(w)) > 2


def test_embedding_tables_are_shared_with_their_own_bits(tmp_path: Path) -> None:
    from test_prune_sparse_vd_embedding import TokenModel, token_data, trained_token_model

    model, data = trained_token_model()
    ctx = Context(data=data, seed=0, progress=False)
    weight_sharing(model, WeightSharingConfig(embedding_bits=2, linear_bits=4), ctx)
    table = model.emb.weight.detach()
    assert len(nonzero_values(table)) <= 4 and torch.all(table[0] == 0)   # padding row
    assert len(nonzero_values(model.head.weight.detach())) <= 16
    assert "emb.weight" in ctx.masks
    assert nc.train.evaluate(model, data.test) > 0.5
    nc.save(model, tmp_path / "shared.nnc")
    stored = {t.name: t for t in formats.inspect(tmp_path / "shared.nnc").tensors}
    assert stored["emb.weight"].stored_bytes < stored["emb.weight"].raw_bytes / 5
    back = nc.load(tmp_path / "shared.nnc", skeleton=TokenModel())
    ids = token_data(8, seed=1).test.dataset.tensors[0]
    assert torch.equal(back(ids), model(ids))
    bag, _ = trained_token_model(bag=True)
    weight_sharing(bag, WeightSharingConfig(embedding_bits=1), ctx)
    assert len(nonzero_values(bag.emb.weight.detach())) <= 2
