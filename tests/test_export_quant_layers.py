"""ONNX export of binary and low-bit layers (issue 9, section 4): each layer type alone and in
small models, checked by ``onnx.checker`` and run in ONNX Runtime against the torch layer.

Tolerance (see :mod:`nncompress.export.onnx_quant_layers`): frozen binary layers with
binary inputs are bit-exact; any other layer alone differs by float32 rounding of its sums
only (``REL`` of the largest output); a model also by a quantized input moved one level
where an upstream sum rounded across a level boundary (``MODEL_REL``), with the same argmax
on every sample. The input quantizers themselves are bit-exact in ONNX Runtime, edge cases
included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import nncompress as nc
from helpers import tiny_data
from nncompress import cli, models
from nncompress.errors import UnsupportedLayerError
from nncompress.export import LAYER_FORMS, export_bytes, qualified_name
from nncompress.export.onnx_int8 import run_onnx
from nncompress.export.onnx_quant_layers import InputLinearQuant, InputLogQuant
from nncompress.export.onnx_torch import module_to_onnx
from nncompress.quant import binary_layers as bl
from nncompress.quant import lowbit_layers as ll
from nncompress.quant.binary import BinarizeConfig, binarize
from nncompress.quant.lowbit import LowBitConfig, lowbit
from nncompress.quant.lsq import from_codes, qmax_of, to_codes
from nncompress.technique import Context

#: float32 rounding of the sums: max |ORT - torch| <= REL * max |torch output| (+ tiny).
REL = 1e-5
#: a model: one quantized input moved one level by upstream rounding (measured <= 1.5e-3).
MODEL_REL = 5e-3


def _seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _onnx_vs_torch(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(ORT outputs, torch outputs)`` of ``model`` exported on ``x`` (checker passed)."""
    model.eval()
    data = module_to_onnx(model, (x,))
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    with torch.no_grad():
        want = model(x).numpy()
    return run_onnx(data, x)[0], want


def _assert_close(got: np.ndarray, want: np.ndarray, rel: float = REL) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    bound = rel * float(np.abs(want).max()) + 1e-7
    assert float(np.abs(got - want).max()) <= bound


# -- binary layers ------------------------------------------------------------------------

def _binary_cases() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (bl.BinaryLinear(67, 9), (5, 67)),                                  # not 64-aligned
        (bl.BinaryConv1d(5, 7, 3, padding=1), (3, 5, 11)),
        (bl.BinaryConv1d(4, 6, 3, stride=2, groups=2, bias=False), (3, 4, 12)),  # grouped
        (bl.BinaryConv2d(3, 5, 3, padding="same"), (2, 3, 6, 7)),
        (bl.BinaryConv2d(3, 4, (2, 3), stride=2, dilation=(1, 2)), (2, 3, 9, 9)),
    ]


def _frozen_binary(layer: nn.Module, activations: bool) -> nn.Module:
    layer.activations = activations
    if not activations:
        layer.threshold = None
    elif layer.threshold is not None:
        with torch.no_grad():
            layer.threshold.copy_(_seeded(layer.threshold.numel(), seed=5) * 0.3)
    return layer.freeze().eval()


@pytest.mark.parametrize("case", range(5))
def test_frozen_binary_layers_with_binary_inputs_are_bit_exact(case: int) -> None:
    layer, shape = _binary_cases()[case]
    frozen = _frozen_binary(layer, activations=True)
    x = _seeded(*shape, seed=case)
    x[(0, 0) + (0,) * (x.dim() - 2)] = float(frozen.threshold[0])  # x - t == 0 gives +1
    got, want = _onnx_vs_torch(frozen, x)
    np.testing.assert_array_equal(got, want)        # integer sums: no rounding to differ
    with torch.no_grad():
        np.testing.assert_array_equal(got, frozen.reference(x).numpy())


@pytest.mark.parametrize("case", range(5))
def test_frozen_binary_layers_with_real_inputs_match_to_rounding(case: int) -> None:
    layer, shape = _binary_cases()[case]
    frozen = _frozen_binary(layer, activations=False)
    got, want = _onnx_vs_torch(frozen, _seeded(*shape, seed=case))
    _assert_close(got, want)


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("activations", [True, False])
def test_latent_binary_layers_export_as_they_run_in_eval(case: int, activations: bool) -> None:
    layer, shape = _binary_cases()[case]
    torch.manual_seed(case)
    if not activations:
        layer.threshold = None
    layer.stochastic = True                          # eval is deterministic regardless
    before = layer.weight.detach().clone()
    got, want = _onnx_vs_torch(layer, _seeded(*shape, seed=case))
    _assert_close(got, want)
    assert torch.equal(layer.weight, before)        # the stand-in did not clip in place


# -- low-bit layers -----------------------------------------------------------------------

def _lowbit_cases() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (nn.Linear(10, 6), (5, 10)),
        (nn.Conv1d(4, 6, 3, padding=1, groups=2), (3, 4, 9)),
        (nn.Conv1d(4, 4, 3, stride=2, groups=4, bias=False), (3, 4, 9)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 7)),
    ]


def _lowbit(case: int, quantizer: str, acts: int | None, signed: bool, bits: int = 3
            ) -> tuple[nn.Module, torch.Tensor]:
    layer, shape = _lowbit_cases()[case]
    low = ll.from_float(layer, weight_bits=bits, activation_bits=acts, quantizer=quantizer,
                        act_signed=signed).eval()
    x = _seeded(*shape, seed=case)
    with torch.no_grad():
        low(x)                                       # sets the input step from x
    return low, x


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("quantizer", ["linear", "log"])
@pytest.mark.parametrize(("acts", "signed"), [(None, True), (3, True), (4, False)])
def test_frozen_lowbit_layers_match_to_rounding(case: int, quantizer: str, acts: int | None,
                                                signed: bool) -> None:
    low, x = _lowbit(case, quantizer, acts, signed)
    frozen = low.freeze().eval()
    got, want = _onnx_vs_torch(frozen, x * 1.7)      # inputs past the clip range too
    _assert_close(got, want)


@pytest.mark.parametrize("quantizer", ["linear", "log"])
def test_latent_lowbit_layers_export_like_their_frozen_form(quantizer: str) -> None:
    low, x = _lowbit(1, quantizer, 4, False)
    got, want = _onnx_vs_torch(low, x)
    _assert_close(got, want)
    unset = ll.from_float(nn.Linear(4, 3), weight_bits=3, activation_bits=4).eval()
    with pytest.raises(UnsupportedLayerError, match="input step is not set") as info:
        export_bytes(unset, torch.randn(2, 4))
    assert "\n" not in str(info.value)


def _edge_values() -> torch.Tensor:
    """Powers of two, the log rounding's half-octave thresholds and their float32
    neighbours, denormals, zeros, large and random values, both signs: ``[1, N]``."""
    pw = torch.pow(2.0, torch.arange(-150, 4).float())
    up = pw * (1.0 + 0x3504F4 / 2.0**23)
    down, zero = torch.zeros(1), torch.full((1,), 1e9)
    parts = [pw, up, torch.nextafter(up, down), torch.nextafter(pw, down),
             torch.nextafter(pw, zero), _seeded(4000) * torch.exp2(torch.arange(4000) % 40 - 30.0),
             torch.tensor([0.0, 1e-45, 1e-39, 0.5, 1.5, 2.5, 3.0, 1e30])]
    v = torch.cat(parts)
    return torch.cat([v, -v]).reshape(1, -1)


@pytest.mark.parametrize("kind", ["linear", "log"])
@pytest.mark.parametrize("signed", [True, False])
def test_input_quantizers_are_bit_exact_in_onnx_runtime(kind: str, signed: bool) -> None:
    v = _edge_values()
    cls = InputLogQuant if kind == "log" else InputLinearQuant
    for bits in range(2, 9):
        qmax = qmax_of(bits, signed)
        for step in (torch.tensor(1.0), torch.tensor(0.37), torch.tensor(3e-3)):
            want = from_codes(kind, to_codes(kind, v, step, qmax, signed), step, qmax)
            got, mine = _onnx_vs_torch(cls(step, qmax, signed), v)
            np.testing.assert_array_equal(mine, want.numpy())
            np.testing.assert_array_equal(got, want.numpy())


def test_every_layer_type_has_a_stand_in() -> None:
    classes = (bl.FrozenBinaryLinear, bl.FrozenBinaryConv1d, bl.FrozenBinaryConv2d,
               bl.BinaryLinear, bl.BinaryConv1d, bl.BinaryConv2d,
               ll.FrozenLowBitLinear, ll.FrozenLowBitConv1d, ll.FrozenLowBitConv2d,
               ll.LowBitLinear, ll.LowBitConv1d, ll.LowBitConv2d)
    for cls in classes:
        assert f"onnx:{qualified_name(cls)}" in LAYER_FORMS


# -- small models -------------------------------------------------------------------------

def _binarized_mlp(activations: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = models.build("mlp", (1, 12), 3, hidden=(16, 8))
    config = BinarizeConfig(activations=activations, epochs=1, lr=0.01)   # keeps first/last
    return binarize(model, config, Context(data=tiny_data(), seed=0, progress=False)).eval()


def _lowbit_cnn(quantizer: str, acts: int | None) -> nn.Module:
    data = tiny_data(features=24, classes=2)
    torch.manual_seed(0)
    model = models.build("cnn1d", (1, 24), 2, channels=[8, 16, 16])
    config = LowBitConfig(weight_bits=3, activation_bits=acts, quantizer=quantizer, epochs=0,
                          calibration=64)
    return lowbit(model, config, Context(data, progress=False)).eval()


def _assert_model_matches(model: nn.Module, x: torch.Tensor) -> None:
    result = export_bytes(model, x)
    onnx.checker.check_model(onnx.load_from_string(result.data), full_check=True)
    with torch.no_grad():
        want = model(x).numpy()
    got = run_onnx(result.data, x)[0]
    _assert_close(got, want, MODEL_REL)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert result.max_abs_diff <= MODEL_REL * float(np.abs(want).max()) + 1e-7


@pytest.mark.parametrize("activations", [True, False])
def test_binarized_mlp_with_kept_first_and_last_layers(activations: bool) -> None:
    model = _binarized_mlp(activations)
    layers = model.layers
    assert type(layers.fc1) is nn.Linear and type(layers.fc3) is nn.Linear
    assert isinstance(layers.fc2, bl.FrozenBinaryLinear)
    assert layers.fc2.activations is activations
    _assert_model_matches(model, torch.cat([x for x, _ in tiny_data().test]))


@pytest.mark.parametrize("quantizer", ["linear", "log"])
@pytest.mark.parametrize("acts", [None, 4])
def test_lowbit_cnn_with_and_without_input_bits(quantizer: str, acts: int | None) -> None:
    model = _lowbit_cnn(quantizer, acts)
    frozen = [m for m in model.modules() if isinstance(m, ll._Frozen)]
    assert frozen and any(m.quantizer == quantizer for m in frozen)
    assert all((m.activation_bits is None) == (acts is None) for m in frozen)
    _assert_model_matches(model, torch.cat([x for x, _ in tiny_data(features=24).test]))


# -- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "lowbit"])
def test_cli_exports_saved_quantized_models(kind: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = _binarized_mlp() if kind == "binary" else _lowbit_cnn("log", 4)
    shape = [1, 12] if kind == "binary" else [1, 24]
    path, out = tmp_path / f"{kind}.nnc", tmp_path / f"{kind}.onnx"
    nc.save(model, path, meta={"input_shape": shape})
    code = cli.main(["export", str(path), "--format", "onnx", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "onnx:module" in printed and "max |diff|" in printed
    # k-bit / +-1 weights: at most 2**k values, stored as codebook + uint8 indices
    assert "stored as codebook + uint8 indices" in printed
    onnx.checker.check_model(str(out), full_check=True)
    x = _seeded(16, *shape, seed=9)
    with torch.no_grad():
        want = nc.load(path).eval()(x).numpy()
    got = run_onnx(out.read_bytes(), x)[0]
    _assert_close(got, want, MODEL_REL)
    assert (got.argmax(1) == want.argmax(1)).all()
