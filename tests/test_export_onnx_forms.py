"""ONNX export of every compressed form (issue 10, section 1), the way a user gets there:
a tiny model, the technique's own ``apply`` with a tiny dataset, ``nc.save`` to ``.nnc``
and ``nc.load`` back, ``export(...)``, ``onnx.checker`` (full check), then ONNX Runtime on
``N`` seeded samples against the loaded module.

Tolerances (max |ORT - torch| over all outputs):
- float forms: ``REL`` (1e-4) of the largest |output| -- float kernels sum in another
  order (measured <= 4e-7 relative on every form here);
- low-bit / binarized models: a quantized input can move one level where an upstream sum
  rounds across a level boundary (see :mod:`nncompress.export.onnx_quant_layers`; trained
  models: <= 0.7 % of samples, <= 1.5e-3 of the largest output). On these untrained tiny
  models (small outputs, many values near a boundary): at most ``QUANT_SAMPLES`` (1/8) of
  the ``N`` samples beyond ``REL``, and every sample within ``QUANT_REL`` (5e-2); and the
  stand-in model the exporter traces equals the loaded model bit for bit in torch;
- int8 models: bit for bit (exported as integer ONNX of the integer reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from helpers import TINY_MODELS, tiny_data
from nncompress import formats, models
from nncompress.data import Dataset
from nncompress.errors import UnsupportedLayerError
from nncompress.export import export, export_bytes
from nncompress.export.onnx_int8 import example_tensors, run_onnx
from nncompress.export.onnx_torch import with_stand_ins
from nncompress.technique import Context, all_techniques

#: samples every export is checked on.
N = 32
#: float forms: max |ORT - torch| <= REL * max |torch output|.
REL = 1e-4
#: low-bit / binarized models: samples allowed beyond REL (an input moved one level) ...
QUANT_SAMPLES = N // 8
#: ... and the bound on every sample, relative to the largest |output|.
QUANT_REL = 5e-2



@dataclass(frozen=True)
class Made:
    """A compressed model, its example (``N`` samples), the skeleton ``nc.load`` needs for
    a plain ``nn.Module`` (None: the file rebuilds it) and what the loaded model and its
    file must show for the form to be there."""

    model: nn.Module
    example: Any
    skeleton: nn.Module | None = None
    holds: Callable[[nn.Module], bool] = lambda m: True
    encodings: dict[str, str] | None = None     # nc.save's per-tensor encodings
    tolerance: str = "float"                    # "float" | "quant" | "exact"


def _samples(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    return torch.randn(N, *shape, generator=torch.Generator().manual_seed(seed))


def _data(shape: tuple[int, ...], classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=g)
    ds = TensorDataset(x, torch.randint(0, classes, (64,), generator=g))
    return Dataset("tiny", DataLoader(ds, batch_size=16, shuffle=True,
                                      generator=torch.Generator().manual_seed(0)),
                   DataLoader(ds, batch_size=32), shape, classes)


def _apply(model: nn.Module, data: Dataset, technique: str, **config: Any) -> nn.Module:
    tech = all_techniques().get(technique)
    return tech.apply(model, tech.config(**config), Context(data=data, progress=False))


def _build(name: str) -> nn.Module:
    shape, overrides = TINY_MODELS[name]
    torch.manual_seed(0)
    return models.build(name, shape, 3, **overrides)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _has(*names: str) -> Callable[[nn.Module], bool]:
    """The loaded model holds a layer whose class name contains one of ``names``."""
    return lambda m: any(n in type(x).__name__ for x in m.modules() for n in names)


# ----------------------------------------------------------------------------- forms


def _dense(name: str) -> Made:
    return Made(_build(name), _samples(TINY_MODELS[name][0]))


def _pruned(name: str) -> Made:
    shape = TINY_MODELS[name][0]
    full = _params(_build(name))
    model = _apply(_build(name), _data(shape), "l1_filter_prune", ratio=0.5,
                   epochs_per_step=0)
    return Made(model, _samples(shape), holds=lambda m: _params(m) < full)


def _low_rank(name: str, **config: Any) -> Made:
    shape = TINY_MODELS[name][0]
    model = _apply(_build(name), _data(shape), "low_rank", rank_ratio=0.5, min_params=1,
                   **config)
    if config.get("recurrent") == "projection":
        return Made(model, _samples(shape), holds=lambda m: any(
            isinstance(x, nn.LSTM) and x.proj_size > 0 for x in m.modules()))
    return Made(model, _samples(shape), holds=_has("LowRank"))


def _deep_compression(name: str) -> Made:
    """Han et al. (2016): magnitude pruning, then 4-bit weight sharing, every weight
    matrix saved as Deep Compression stores it (``sparse_rel_huffman``: relative indices
    of the non-zeros, their shared values, both Huffman-coded)."""
    shape = TINY_MODELS[name][0]
    data = _data(shape)
    model = _apply(_build(name), data, "magnitude_prune", sparsity=0.7, epochs_per_step=0)
    model = _apply(model, data, "weight_sharing", bits=4, epochs=0)
    encodings = {n: "sparse_rel_huffman" for n, p in model.state_dict().items()
                 if p.dim() > 1}
    return Made(model, _samples(shape), encodings=encodings)


def _hashed_linear() -> Made:
    shape = TINY_MODELS["mlp"][0]
    model = _apply(_build("mlp"), _data(shape), "hashed_net", compression=4, epochs=0,
                   seed=0)
    return Made(model, _samples(shape), holds=_has("HashedLinear"))


class TokenModel(nn.Module):
    """Token ids ``[B, T]`` -> Embedding -> mean over time -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))


def _token_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (64, 10), generator=g)
    ds = TensorDataset(ids, ids[:, 0] % 3)
    return Dataset("tokens", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32),
                   (10,), 3)


def _token_ids() -> torch.Tensor:
    return torch.randint(0, 40, (N, 10), generator=torch.Generator().manual_seed(6))


def _hashed_embedding() -> Made:
    torch.manual_seed(0)
    model = _apply(TokenModel(), _token_data(), "hashed_net", compression=4, epochs=0,
                   seed=0, layers=("emb",))
    return Made(model, _token_ids(), TokenModel(), holds=_has("HashedEmbedding"))


def _folded(name: str) -> Made:
    shape = TINY_MODELS[name][0]
    model = _build(name)
    with torch.no_grad():          # non-trivial statistics, so folding changes weights
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = _apply(model, _data(shape), "fold_batchnorm")
    return Made(model, _samples(shape), holds=lambda m: not any(
        isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules()))


def _lowbit(name: str, quantizer: str) -> Made:
    shape = TINY_MODELS[name][0]
    model = _apply(_build(name), _data(shape), "lowbit", weight_bits=3, activation_bits=4,
                   quantizer=quantizer, keep_first=False, epochs=0, calibration=32)
    return Made(model, _samples(shape), holds=_has("LowBit"), tolerance="quant")


def _binarized(name: str) -> Made:
    shape = TINY_MODELS[name][0]
    model = _apply(_build(name), _data(shape), "binarize", epochs=0, keep_first=False)
    return Made(model, _samples(shape), holds=_has("Binary"), tolerance="quant")


def _int8(name: str) -> Made:
    shape = TINY_MODELS[name][0]
    model = _apply(_build(name), _data(shape), "quantize_int8")
    return Made(model, _samples(shape), holds=_has("Int8"), tolerance="exact")


class StackedBiGRU(nn.Module):
    """``[B, 1, T]`` -> 2-layer bidirectional GRU -> last step -> LayerNorm -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(self.norm(out[:, -1]))


def _stacked_rnn(technique: str | None) -> Made:
    torch.manual_seed(0)
    model = StackedBiGRU()
    if technique is not None:
        model = _apply(model, _data((1, 9)), technique, ratio=0.5, epochs_per_step=0)
    return Made(model, _samples((1, 9)), StackedBiGRU(),
                holds=lambda m: m.rnn.hidden_size == (6 if technique is None else 3))


class Encoder(nn.Module):
    """``[B, 1, 20]`` -> 5 patches of 4 -> ``nn.TransformerEncoderLayer`` -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x.reshape(x.shape[0], 5, 4))).mean(dim=1))


def _encoder(decomposed: bool) -> Made:
    from nncompress.modules import decompose

    torch.manual_seed(0)
    model, skeleton = Encoder(), Encoder()
    if not decomposed:      # PyTorch's own layer (its fused fast path off while tracing)
        return Made(model, _samples((1, 20)), skeleton, holds=_has("TransformerEncoderLayer"))
    model = _apply(decompose(model)[0], _data((1, 20)), "l1_filter_prune", ratio=0.5,
                   epochs_per_step=0)   # heads and FFN units of the rewritten layer
    return Made(model, _samples((1, 20)), skeleton,
                holds=lambda m: m.layer.self_attn.num_heads == 1)


def _text() -> Made:
    """The token-id generality model (dict input: int64 ids and a bool padding mask)."""
    from nncompress.models.plain import TextClassifier

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(N, 40, dtype=torch.bool)
    mask[:, 30:] = False
    example = {"ids": torch.randint(1, 33, (N, 40), generator=g), "mask": mask}
    return Made(TextClassifier(dim=8, classes=3), example, TextClassifier(dim=8, classes=3))


def _zipped() -> Made:
    """A multi-task zipped pair (He, Zhou & Thiele, 2018): one graph, two outputs."""
    from nncompress.data import class_subset
    from nncompress.share.zipping import zip_models

    data = tiny_data(n=96, features=12, classes=4)
    data_a, data_b = class_subset(data, [0, 1]), class_subset(data, [2, 3])
    torch.manual_seed(0)
    a, b = models.MLP((1, 12), 2, hidden=(8, 6)), models.MLP((1, 12), 2, hidden=(8, 6))
    result = zip_models(a, b, data_a, data_b, share=0.5, retrain_epochs=0, final_epochs=0)
    return Made(result.model, _samples((1, 12)), holds=_has("ZippedPair"))


FORMS: dict[str, Callable[[], Made]] = {
    **{f"dense-{n}": (lambda n=n: _dense(n)) for n in TINY_MODELS},
    **{f"pruned-{n}": (lambda n=n: _pruned(n))
       for n in ("cnn1d", "cnn2d", "rescnn", "gru", "lstm", "transformer")},
    "lowrank-linear": lambda: _low_rank("mlp"),
    "lowrank-conv": lambda: _low_rank("cnn1d"),
    "lowrank-gru": lambda: _low_rank("gru"),
    "lowrank-lstm": lambda: _low_rank("lstm"),
    "lowrank-lstm-projection": lambda: _low_rank("lstm", recurrent="projection"),
    "deep-compression-mlp": lambda: _deep_compression("mlp"),
    "deep-compression-cnn1d": lambda: _deep_compression("cnn1d"),
    "deep-compression-gru": lambda: _deep_compression("gru"),
    "hashed-linear": _hashed_linear,
    "hashed-embedding": _hashed_embedding,
    **{f"bn-folded-{n}": (lambda n=n: _folded(n)) for n in ("cnn1d", "cnn2d", "rescnn")},
    "lowbit-mlp-linear": lambda: _lowbit("mlp", "linear"),
    "lowbit-cnn1d-log": lambda: _lowbit("cnn1d", "log"),
    "binarized-mlp": lambda: _binarized("mlp"),
    "binarized-cnn1d": lambda: _binarized("cnn1d"),
    "int8-cnn1d": lambda: _int8("cnn1d"),
    "int8-lstm": lambda: _int8("lstm"),
    "stacked-bidirectional-gru": lambda: _stacked_rnn(None),
    "stacked-bidirectional-gru-pruned": lambda: _stacked_rnn("l1_filter_prune"),
    "transformer-encoder-layer": lambda: _encoder(False),
    "transformer-encoder-layer-decomposed-pruned": lambda: _encoder(True),
    "token-ids-text": _text,
    "zipped-pair": _zipped,
}


def _outputs(model: nn.Module, example: Any) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    return [o.numpy() for o in ([out] if isinstance(out, torch.Tensor) else out)]


def _assert_matches(got: list[np.ndarray], want: list[np.ndarray], tolerance: str) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if tolerance == "exact":
            np.testing.assert_array_equal(g, w)
            continue
        scale = float(np.abs(w).max())
        diff = np.abs(g.astype(np.float64) - w).reshape(len(w), -1).max(axis=1)
        if tolerance == "float":
            assert float(diff.max()) <= REL * scale
        else:
            assert int((diff > REL * scale).sum()) <= QUANT_SAMPLES
            assert float(diff.max()) <= QUANT_REL * scale


@pytest.mark.parametrize("form", sorted(FORMS))
def test_saved_form_exports_checks_and_matches_in_onnx_runtime(form: str,
                                                               tmp_path: Path) -> None:
    made = FORMS[form]()
    path = tmp_path / "m.nnc"
    nc.save(made.model.eval(), path, encodings=made.encodings)
    if made.encodings:
        used = {t.name: t.encoding for t in formats.inspect(path).tensors}
        assert all(used[n] == e for n, e in made.encodings.items())
    loaded = nc.load(path, **({} if made.skeleton is None else {"skeleton": made.skeleton}))
    loaded.eval()
    assert made.holds(loaded)
    result = export(loaded, tmp_path / "m.onnx", made.example)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.SerializeToString() == result.data
    got = run_onnx(proto, *example_tensors(made.example, [i.name for i in proto.graph.input]))
    want = _outputs(loaded, made.example)
    _assert_matches(got, want, made.tolerance)
    if made.tolerance == "quant":     # what is traced computes exactly what the layers do
        np.testing.assert_array_equal(_outputs(with_stand_ins(loaded), made.example)[0],
                                      want[0])
    assert result.max_abs_diff <= max(float(np.abs(w).max()) for w in want)
    if form == "zipped-pair":
        assert [o.name for o in proto.graph.output] == ["output0", "output1"]


class StatefulLSTMP(nn.Module):
    """Time-major, stacked, bidirectional LSTM with projections, given its initial state,
    read through its output and both final states."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, (h, c) = self.rnn(x.transpose(0, 1), (h0.transpose(0, 1), c0.transpose(0, 1)))
        return out.transpose(0, 1), h.transpose(0, 1), c.transpose(0, 1)


def test_lstm_with_projections_unrolls_in_every_layout() -> None:
    torch.manual_seed(0)
    model = StatefulLSTMP().eval()
    g = torch.Generator().manual_seed(1)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 5, 3, generator=g), torch.randn(batch, 4, 2, generator=g),
                torch.randn(batch, 4, 6, generator=g))

    with torch.no_grad():      # the stand-in itself, in torch: the layer's own outputs
        args = inputs(4)
        for got, want in zip(with_stand_ins(model)(*args), model(*args), strict=True):
            torch.testing.assert_close(got, want, rtol=0.0, atol=1e-6)
    result = export_bytes(model, inputs(N))
    assert any("sequence length is fixed" in n for n in result.notes)
    assert len(result.notes) == 2
    for batch in (1, 5):       # the batch stays dynamic; the 5 time steps are fixed
        args = inputs(batch)
        with torch.no_grad():
            want = [w.numpy() for w in model(*args)]
        _assert_matches(run_onnx(result.data, *args), want, "float")


def test_cli_exports_a_deep_compression_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from nncompress import cli

    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    made = _deep_compression("cnn1d")
    path, out = tmp_path / "dc.nnc", tmp_path / "dc.onnx"
    nc.save(made.model.eval(), path, meta={"input_shape": list(TINY_MODELS["cnn1d"][0])},
            encodings=made.encodings)
    assert cli.main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnx:module" in printed and "note: " in printed
    onnx.checker.check_model(str(out), full_check=True)
    _assert_matches(run_onnx(out.read_bytes(), made.example),
                    _outputs(nc.load(path).eval(), made.example), "float")


def test_sparse_engine_layers_export_as_their_dense_layers() -> None:
    from nncompress.kernels.sparse import SparseLinear
    from nncompress.kernels.sparse_conv import SparseConv

    torch.manual_seed(0)
    conv, lin = nn.Conv1d(1, 4, 3), nn.Linear(4 * 10, 3)
    with torch.no_grad():
        for layer in (conv, lin):
            layer.weight[layer.weight.abs() < 0.1] = 0.0
    model = nn.Sequential(SparseConv(conv), nn.ReLU(), nn.Flatten(),
                          SparseLinear.from_linear(lin)).eval()
    x = _samples((1, 12))
    result = export_bytes(model, x)
    want = _outputs(model, x)[0]
    assert result.max_abs_diff <= REL * float(np.abs(want).max())
    ops = {n.op_type for n in onnx.load_from_string(result.data).graph.node}
    assert {"Conv", "Gemm"} <= ops


class Cumulative(nn.Module):
    """A block whose own forward uses an op with no ONNX form (``cumprod``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(self.fc(x), dim=-1)


def test_a_form_that_cannot_export_names_its_layer_in_one_line(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.ReLU(), Cumulative()),
                          nn.Linear(6, 2)).eval()
    with pytest.raises(UnsupportedLayerError) as info:
        export(model, tmp_path / "m.onnx", torch.randn(3, 4))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot export layer '1.1' (Cumulative) to ONNX: ")
    assert "cumprod" in message
    assert not list(tmp_path.iterdir())          # nothing written
