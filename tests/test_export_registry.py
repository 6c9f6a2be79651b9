"""The export dispatcher: lookup order (model class, program, any module), layer stand-ins,
the first unexportable layer named in one line, float ONNX checked against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.export import (
    EXPORTERS,
    LAYER_FORMS,
    Exporter,
    ExportResult,
    export_bytes,
    exporter_for,
    qualified_name,
)
from nncompress.export.onnx_int8 import run_onnx


class Bessel(nn.Module):
    """Twice its input, computed through an op PyTorch cannot export (``i0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(x) * 0 + 2 * x


class Doubled(Bessel):
    """The same layer with a registered stand-in."""


class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class Special(nn.Sequential):
    """A model class with its own exporter."""


def _register_once() -> None:
    key = f"onnx:{qualified_name(Doubled)}"
    if key not in LAYER_FORMS:
        LAYER_FORMS.register(key, lambda layer: Twice())
    key = f"onnx:{qualified_name(Special)}"
    if key not in EXPORTERS:
        EXPORTERS.register(key, Exporter(key, "onnx", "test", lambda m, x: ExportResult(
            b"special", key, True, 0.0, "none")))


def test_first_unexportable_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4),
                                                                     Bessel()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"^cannot export layer '2\.1' \(Bessel\) "
                                                    r"to ONNX: .*aten::i0"):
        export_bytes(model, torch.randn(3, 4))


def test_registered_stand_in_replaces_the_layer_on_a_copy() -> None:
    _register_once()
    model = nn.Sequential(nn.Linear(4, 4), Doubled(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    result = export_bytes(model, x)
    assert isinstance(model[1], Doubled)                 # the user's model is untouched
    assert result.exporter == "onnx:module" and result.max_abs_diff < 1e-5
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(run_onnx(result.data, x)[0], want, atol=1e-5)


def test_model_class_exporter_wins() -> None:
    _register_once()
    special = Special(nn.Linear(2, 2))
    assert exporter_for(special).name.endswith("Special")
    assert export_bytes(special, torch.zeros(1, 2)).data == b"special"
    assert exporter_for(nn.Sequential(nn.Linear(2, 2))).name == "onnx:module"


def test_keyword_inputs_and_dynamic_batch() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a) * b

    model = TwoInputs().eval()
    g = torch.Generator().manual_seed(1)
    example = {"b": torch.randn(2, 2, generator=g), "a": torch.randn(2, 3, generator=g)}
    result = export_bytes(model, example)
    x = {"b": torch.randn(5, 2, generator=g), "a": torch.randn(5, 3, generator=g)}
    with torch.no_grad():
        want = model(**x).numpy()
    np.testing.assert_allclose(run_onnx(result.data, x["b"], x["a"])[0], want, atol=1e-5)


def test_model_failing_on_the_example_is_bad_input() -> None:
    with pytest.raises(ModelError, match=r"fails on the example input \[\(3, 5\)\]"):
        export_bytes(nn.Linear(4, 2), torch.randn(3, 5))


def test_not_a_model() -> None:
    with pytest.raises(UnsupportedLayerError, match="cannot export a str"):
        export_bytes("model.nnc", None)
