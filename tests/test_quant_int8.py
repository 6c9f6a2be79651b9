"""PyTorch's own building blocks through the integer-only int8 path (Jacob et al., 2018).

Each model is built here, tiny and seeded, and converted by ``quantize_int8``. For each:
the integer reference (:mod:`nncompress.quant.reference`) is within a few output steps of
the float model, the :class:`Int8Model` forward (the generated-C engine) equals the
reference bit for bit at batch 1 and 5, and ``nc.save`` / ``nc.load`` round-trips with
identical outputs and int8 weights in the file. Unsupported layers are refused by name
with the model untouched; ``quantize_int8`` runs as a recipe stage with every observer;
``qat_int8`` puts its fake quantizers at the program's quantization points, trains the
weights through them (STE), converts with the learnt ranges and keeps pruning masks.
"""

from __future__ import annotations

import base64
import copy
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress as nc
from nncompress import formats
from nncompress.data import Dataset
from nncompress.errors import KernelUnavailableError, UnsupportedLayerError
from nncompress.quant import convert, reference
from nncompress.quant.int8 import Int8Model, QuantizeInt8Config, quantize_int8
from nncompress.quant.program import Program
from nncompress.technique import Context

WEIGHT_ROLES = ("w", "table")


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compiled engines go to a temporary cache, not the repository's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNCOMPRESS_CACHE", str(tmp_path_factory.mktemp("int8cache")))
        yield


def data_of(x: torch.Tensor, y: torch.Tensor | None = None, classes: int = 3) -> Dataset:
    """``x`` as a dataset (train batches of 16, not shuffled; labels ``y`` or zeros)."""
    y = torch.zeros(len(x), dtype=torch.int64) if y is None else y
    ds = TensorDataset(x, y)
    return Dataset("tiny", DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=48),
                   tuple(x.shape[1:]), classes)


def to_int8(model: nn.Module, x: torch.Tensor, **config: object) -> tuple[Int8Model, list[str]]:
    """``quantize_int8`` of a copy of ``model`` calibrated on ``x``; the model and its log."""
    ctx = Context(data_of(x), progress=False)
    q = quantize_int8(copy.deepcopy(model), QuantizeInt8Config(**config), ctx)
    return q, ctx.log


def output_scale(program: Program) -> float:
    last = program.ops[-1]
    assert last.kind == "dequantize"
    return program.values[last.inputs[0]].scale


def stored_names(q: Int8Model) -> dict[str, str]:
    """Program const name -> state_dict key (``c<i>``), from the record's consts list."""
    record = json.loads(zlib.decompress(base64.b64decode(q.blob)))
    return {spec[0]: f"c{i}" for i, spec in enumerate(record["consts"])}


def check_steps(model: nn.Module, q: Int8Model, x: torch.Tensor, steps: float) -> float:
    """The reference output is within ``steps`` output steps of the float model's (the
    output's int8 scale; measured 1.2-2.3 steps on the feed-forward models here, bound 3)."""
    with torch.no_grad():
        want = model.eval()(x)
    got = reference.run(q.current_program(), x)[0]
    assert got.shape == want.shape and got.dtype == torch.float32
    error = ((got - want).abs() / output_scale(q.program)).max().item()
    assert error <= steps
    return error


def check_file(q: Int8Model, x: torch.Tensor, path: Path) -> None:
    """Save / load round trip: identical outputs, int8 weights in the file."""
    nc.save(q, path)
    loaded = nc.load(path)
    assert isinstance(loaded, Int8Model)
    assert torch.equal(loaded(x), q(x))
    info = {t.name: t for t in formats.inspect(path).tensors}
    names = stored_names(q)
    program = q.program
    weights = [op.consts[r] for op in program.ops for r in WEIGHT_ROLES if r in op.consts]
    weights += [n for n in program.consts if n.endswith(("w_ih", "w_hh"))]   # gru / lstm
    assert weights
    for name in weights:
        t = info[names[name]]
        assert t.dtype == "int8", (name, t.dtype)
        assert t.stored_bytes <= t.numel
    # LayerNorm parameters (rounded to float16 by the converter) are stored as float16
    floats = sum(t.numel for t in info.values() if t.dtype in ("float32", "float16"))
    float_consts = sum(program.consts[n].numel() for op in program.float_ops()
                       for n in op.consts.values())
    assert floats == float_consts


def check_engine(q: Int8Model, x: torch.Tensor, *, tolerance: int = 0) -> None:
    """The C engine equals the reference bit for bit at batch 1 and 5 (``tolerance``
    output steps where the program has float ops: C computes them in double)."""
    try:
        engine = q.engine(x[:1])
    except KernelUnavailableError as exc:
        pytest.skip(f"no C engine here ({str(exc)[:80]}); reference and file checked")
    program = q.current_program()
    scale = output_scale(program)
    for batch in (1, 5):
        want = reference.run(program, x[:batch])[0]
        got = engine(x[:batch])[0]
        assert got.shape == want.shape
        if tolerance == 0:
            assert torch.equal(got, want)
            assert torch.equal(q(x[:batch]), want)
        else:   # measured: equal on every test here
            assert ((got - want).abs() / scale).max().item() <= tolerance + 1e-6
            assert (got == want).float().mean().item() >= 0.9


def check_all(model: nn.Module, x: torch.Tensor, steps: float, tmp_path: Path,
              tolerance: int = 0, **config: object) -> tuple[Int8Model, list[str]]:
    model.eval()
    before = copy.deepcopy(model.state_dict())
    q, log = to_int8(model, x, **config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    check_steps(model, q, x, steps)
    check_file(q, x[:5], tmp_path / "m.nnc")
    check_engine(q, x, tolerance=tolerance)
    return q, log


def kinds(q: Int8Model) -> list[str]:
    return [op.kind for op in q.program.ops]


def features(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# -- building blocks ----------------------------------------------------------------------
def test_linear_relu_mlp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16),
                          nn.ReLU(), nn.Linear(16, 3))
    q, log = check_all(model, features(64, 1, 12), 3, tmp_path)
    assert kinds(q).count("linear") == 3 and "clamp" not in kinds(q)   # ReLUs fused
    assert sum("fused into" in line for line in log) == 2


def test_conv1d_groups_depthwise_stride_dilation_same_padding(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(),
        nn.Conv1d(8, 12, 3, groups=4, stride=2), nn.ReLU(),            # grouped, strided
        nn.Conv1d(12, 12, 5, groups=12, dilation=2, padding="same"),   # depthwise, dilated
        nn.ReLU(), nn.Conv1d(12, 6, 1), nn.Flatten(), nn.Linear(6 * 9, 3))
    q, _ = check_all(model, features(64, 2, 20), 3, tmp_path)
    convs = [op for op in q.program.ops if op.kind == "conv"]
    assert [(op.attrs["groups"], op.attrs["stride"], op.attrs["dilation"], op.attrs["padding"])
            for op in convs] == [(1, [1], [1], [1]), (4, [2], [1], [0]), (12, [1], [2], [4]),
                                 (1, [1], [1], [0])]


def test_conv2d_batchnorm_pools(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):       # statistics that fold to something visible
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    q, log = check_all(model, features(64, 1, 8, 8), 3, tmp_path)
    assert [k for k in kinds(q) if k in ("conv", "maxpool", "avgpool")] == [
        "conv", "maxpool", "conv", "avgpool"]
    assert any(line.startswith("fold_batchnorm") and "nothing" not in line for line in log)
    assert "b" in q.program.ops[kinds(q).index("conv", 3)].consts   # the folded BN's bias


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 3, padding=1)
        self.body = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.body(h) + h)
        return self.head(h.flatten(1))


def test_residual_add(tmp_path: Path) -> None:
    torch.manual_seed(3)
    q, _ = check_all(Residual(), features(64, 1, 16), 3, tmp_path)
    assert kinds(q).count("add") == 1


class Branches(nn.Module):
    """Two branches whose ranges differ ~20x, concatenated along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(1, 4, 3, padding=1)
        self.b = nn.Conv1d(1, 3, 5, padding=2)
        self.head = nn.Linear(7 * 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), self.b(x) * 20.0], dim=1)
        return self.head(h.flatten(1))


def test_concat_of_branches_at_different_scales(tmp_path: Path) -> None:
    torch.manual_seed(4)
    q, _ = check_all(Branches(), features(64, 1, 12), 3, tmp_path)
    cat = next(op for op in q.program.ops if op.kind == "concat")
    scales = [q.program.values[v].scale for v in cat.inputs]
    assert max(scales) / min(scales) > 5
    assert cat.attrs["ms"][0] != cat.attrs["ms"][1] or cat.attrs["ss"][0] != cat.attrs["ss"][1]


def test_gelu_sigmoid_tanh_become_tables(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16),
                          nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    q, _ = check_all(model, features(64, 1, 12), 3, tmp_path)
    luts = [op for op in q.program.ops if op.kind == "lut"]
    assert len(luts) == 3 and not q.program.float_ops()
    assert all(q.program.consts[op.consts["table"]].shape == (256,) for op in luts)


class ConvNorm(nn.Module):
    """LayerNorm straight after a conv. (After a ReLU, a row of near-zeros quantized to all
    zeros loses LayerNorm's spike: 50 steps there, a property of LayerNorm, not of the
    conversion.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 6, 3)
        self.norm = nn.LayerNorm(14)
        self.head = nn.Linear(6 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def test_layernorm_after_conv_kept_float_and_logged(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = ConvNorm()
    model.norm.weight.data.uniform_(0.5, 1.5)
    q, log = check_all(model, features(64, 1, 16), 4, tmp_path, tolerance=2)   # measured 2.9
    assert [op.source for op in q.program.float_ops()] == ["norm"]
    assert any("norm (layer_norm) kept in float32" in line for line in log)
    assert any(line.endswith("kept in float32: norm") for line in log)


class Recurrent(nn.Module):
    """A stacked bidirectional GRU / LSTM over ``[B, T, F]`` features, its last step's
    output classified; a seq-first layer gets the input transposed."""

    def __init__(self, cls: type[nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(3, 8, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            y, _ = self.rnn(x)
            return self.head(y[:, -1])
        y, _ = self.rnn(x.transpose(0, 1))
        return self.head(y[-1])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_stacked_bidirectional_rnn(cls: type[nn.RNNBase], batch_first: bool,
                                   tmp_path: Path) -> None:
    torch.manual_seed(7)
    # measured 2.3 (GRU) / 5.6 (LSTM) steps: the recurrent outputs are Q0.7 (2^-7), coarser
    # than the head's output step here
    q, _ = check_all(Recurrent(cls, batch_first), features(48, 6, 3), 8, tmp_path)
    op = next(op for op in q.program.ops if op.kind in ("gru", "lstm"))
    assert op.kind == cls.__name__.lower()
    assert op.attrs["num_layers"] == 2 and op.attrs["bidirectional"] is True
    assert op.attrs["batch_first"] is batch_first


class TokenGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(self.embed(ids))
        return self.head(h[-1])


def test_token_ids_embedding_gru(tmp_path: Path) -> None:
    torch.manual_seed(8)
    ids = torch.randint(0, 20, (48, 7), generator=torch.Generator().manual_seed(8))
    q, _ = check_all(TokenGRU(), ids, 4, tmp_path)
    assert kinds(q)[:2] == ["embedding", "gru"] and "quantize" not in kinds(q)
    assert q.program.values[q.program.inputs[0]].dtype == "int64"


class Encoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first,
                                                norm_first=norm_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self.head(self.layer(x).mean(dim=1))
        return self.head(self.layer(x.transpose(0, 1)).mean(dim=0))


@pytest.mark.parametrize(("batch_first", "norm_first"), [(True, False), (True, True),
                                                         (False, False)])
def test_transformer_encoder_layer(batch_first: bool, norm_first: bool,
                                   tmp_path: Path) -> None:
    torch.manual_seed(9)
    # measured 2.7-3.3 steps; the engine equals the reference here, although its float ops
    # (softmax, layer_norm) may differ by one step at their output (double vs float32)
    q, log = check_all(Encoder(batch_first, norm_first), features(48, 5, 8), 5, tmp_path,
                       tolerance=2)
    assert any("TransformerEncoderLayer -> SplitTransformerEncoderLayer" in line
               for line in log)
    assert kinds(q).count("matmul") == 2 and kinds(q).count("linear") == 7
    fns = sorted(op.attrs["fn"] for op in q.program.float_ops())
    assert fns == ["layer_norm", "layer_norm", "softmax"]


class LastStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inner(x))          # [B, T, 16]
        return self.head(h[:, -1])


def test_indexing_the_last_step(tmp_path: Path) -> None:
    torch.manual_seed(10)
    q, _ = check_all(LastStep(), features(48, 6, 4), 3, tmp_path)
    index = next(op for op in q.program.ops if op.kind == "index")
    assert index.attrs["items"] == [["slice", None, None, None], -1]


# -- refusals -----------------------------------------------------------------------------
class Sorted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _ = torch.sort(self.inner(x.flatten(1)), dim=-1)
        return self.head(values)


class GroupNormed(nn.Module):
    """Conv + BatchNorm (which ``quantize_int8`` would fold) before a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gn(torch.relu(self.bn(self.conv(x)))).flatten(1))


class Recurrent1(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


@pytest.mark.parametrize(("build", "names"), [
    (Sorted, ("sort",)),
    (GroupNormed, ("gn", "GroupNorm")),
    (lambda: Recurrent1(nn.RNN(3, 4, batch_first=True)), ("rnn", "RNN")),
    (lambda: Recurrent1(nn.LSTM(3, 6, batch_first=True, proj_size=4)), ("rnn", "proj_size")),
], ids=["torch.sort", "GroupNorm", "RNN", "LSTM-proj_size"])
@pytest.mark.parametrize("technique", ["quantize_int8", "qat_int8"])
@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_unsupported_layer_is_named_and_model_unchanged(build: Callable[[], nn.Module],
                                                        names: tuple[str, ...],
                                                        technique: str) -> None:
    """Refused before surgery: the BatchNorm is not folded into the model handed in."""
    from nncompress.technique import TECHNIQUES
    spec = TECHNIQUES.get(technique)
    torch.manual_seed(11)
    model = build().eval()
    x = features(32, 6, 3) if isinstance(model, Recurrent1) else features(32, 1, 12)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_var.uniform_(0.5, 2.0)
    before = copy.deepcopy(model.state_dict())
    ctx = Context(data_of(x), progress=False)
    with pytest.raises(UnsupportedLayerError) as info:
        spec.apply(model, spec.config(), ctx)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in names), message
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the techniques -----------------------------------------------------------------------
class NormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1)))))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Dataset]:
    """A small classifier trained on the tiny dataset (float accuracy ~0.95)."""
    from helpers import tiny_data
    data = tiny_data(n=192)
    torch.manual_seed(12)
    model = NormMLP()
    nc.fit(model, data, epochs=25, lr=1e-2, progress=False)
    return model.eval(), data


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "kl"])
def test_quantize_int8_recipe_stage(observer: str, trained: tuple[nn.Module, Dataset]) -> None:
    model, data = trained
    recipe = nc.Recipe(f"int8-{observer}", [nc.Stage.technique(
        "quantize_int8", observer=observer, calibration_batches=4)])
    result = nc.compress(model, recipe, data, progress=False, measure_latency=False)
    assert isinstance(result.model, Int8Model)
    drop = result.baseline.accuracy - result.final.accuracy
    assert result.baseline.accuracy > 0.85 and drop <= 0.03      # <= 5 of 192 samples
    assert any(line.endswith("kept in float32: norm") for line in result.log)
    assert any("norm (layer_norm) kept in float32" in line for line in result.log)
    assert result.final.artifact_bytes < result.baseline.artifact_bytes


def small_mlp(seed: int = 13) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.GELU(), nn.Linear(16, 3))


def test_qat_fake_quantizers_sit_at_the_quantization_points() -> None:
    from nncompress.quant.convert import calibrate, quantization_points, trace
    from nncompress.quant.fakequant import FakeQuantize
    from nncompress.quant.qat import prepare_qat
    model, x = small_mlp(), features(32, 1, 12)
    gm = trace(model, (x,))
    cal = calibrate(gm, [x[:16], x[16:]])
    points = quantization_points(gm, cal)
    qat, quantizers = prepare_qat(model, cal, (x,))
    assert list(quantizers) == points
    # input, fused Linear+ReLU (after the ReLU, not between), Linear, GELU table, Linear
    assert points == ["input_1", "_2", "_3", "_4", "_5"]
    inserted = [n for n in qat.graph.nodes if n.op == "call_module"
                and isinstance(qat.get_submodule(n.target), FakeQuantize)]
    assert [n.args[0].name for n in inserted] == points
    for node in inserted:
        assert list(node.args[0].users) == [node]          # every use goes through it
        fq = qat.get_submodule(node.target)
        assert (float(fq.lo), float(fq.hi)) == pytest.approx(cal.ranges[node.args[0].name])
    for i in (1, 3, 5):          # the layers are stand-ins holding the model's parameters
        assert type(qat.get_submodule(str(i))) is not nn.Linear
        assert qat.get_submodule(str(i)).weight is model[i].weight


def test_qat_gradients_flow_to_the_weights_through_fake_quantization() -> None:
    from nncompress.quant.convert import calibrate, trace
    from nncompress.quant.fakequant import fake_quant_weight
    from nncompress.quant.qat import prepare_qat
    model, x = small_mlp(), features(32, 1, 12)
    qat, _ = prepare_qat(model, calibrate(trace(model, (x,)), [x]), (x,))
    qat.train()
    out = qat(x)
    with torch.no_grad():
        float_out = model(x)
    assert not torch.equal(out, float_out)                 # quantization is simulated...
    assert (out - float_out).abs().max() < 0.1             # ...and stays close
    out.square().mean().backward()
    for i in (1, 3, 5):
        grad = model[i].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # straight through: d/dw sum(fake_quant(w) * c) = c exactly
    w = model[1].weight.detach().clone().requires_grad_(True)
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    (fake_quant_weight(w) * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_qat_converts_with_the_learnt_ranges(trained: tuple[nn.Module, Dataset],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from nncompress.quant import qat as qat_module
    from nncompress.quant.affine import activation_qtype
    from nncompress.quant.qat import QATInt8Config, qat_int8
    model, data = trained
    seen: list[dict] = []
    calibrations: list[dict] = []
    prepare = qat_module.prepare_qat

    def spy(m: nn.Module, cal: object, *args: object, **kwargs: object) -> object:
        calibrations.append(dict(cal.ranges))
        gm, quantizers = prepare(m, cal, *args, **kwargs)
        seen.append(quantizers)
        return gm, quantizers

    monkeypatch.setattr(qat_module, "prepare_qat", spy)
    ctx = Context(data, progress=False)
    q = qat_int8(copy.deepcopy(model), QATInt8Config(epochs=1, lr=1e-3, momentum=0.5), ctx)
    assert isinstance(q, Int8Model) and len(seen) == 1
    qtypes = set(q.program.values.values())
    moved = 0
    for name, fq in seen[0].items():
        learnt = activation_qtype(float(fq.lo), float(fq.hi))
        assert learnt in qtypes, name
        moved += learnt != activation_qtype(*calibrations[0][name])
    assert moved >= 2                      # training moved ranges, and those are used
    assert any("fake quantizers" in line for line in ctx.log)


def test_qat_keeps_pruning_masks(trained: tuple[nn.Module, Dataset]) -> None:
    from nncompress.quant.affine import quantize_tensor, weight_scales
    from nncompress.quant.qat import QATInt8Config, qat_int8
    model, data = trained
    model = copy.deepcopy(model)
    masks = {}
    for name in ("fc1.weight", "fc2.weight"):
        w = model.get_parameter(name)
        keep = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
        with torch.no_grad():
            w.mul_(keep)
        masks[name] = keep
    pruned = copy.deepcopy(model)
    ctx = Context(data, progress=False, masks=dict(masks))
    q = qat_int8(model, QATInt8Config(epochs=1, lr=1e-2), ctx)
    program = q.program
    linears = [op for op in program.ops if op.kind == "linear"]
    for op, name in zip(linears, ("fc1.weight", "fc2.weight"), strict=True):
        wq = program.consts[op.consts["w"]]
        assert (wq[~masks[name]] == 0).all(), name        # pruned weights stay zero
        assert (wq[masks[name]] != 0).float().mean() > 0.9
    before = pruned.get_parameter("fc1.weight").detach()
    scales = weight_scales(before).reshape(-1, 1)
    untrained = quantize_tensor(before, scales, 0, -127, 127).to(torch.int8)
    assert not torch.equal(program.consts[linears[0].consts["w"]], untrained)   # QAT trained


def test_dict_inputs_run_by_name_in_the_programs_order() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
            return self.fc(self.e(ids).mean(dim=1)) + shift

    torch.manual_seed(0)
    model = TwoInputs().eval()
    x = {"shift": torch.randn(4, 3), "ids": torch.randint(0, 20, (4, 5))}
    program, _ = convert.convert(model, [x])
    q = Int8Model.from_program(program)
    assert program.inputs == ["ids", "shift"]
    assert torch.equal(q(**x), q(x["ids"], x["shift"]))
    assert float((q(**x) - model(**x)).abs().max()) < 0.05
