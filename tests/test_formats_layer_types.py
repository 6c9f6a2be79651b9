"""The layer-type registry: filled by each layer package, never by formats importing them."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from nncompress import formats
from nncompress.errors import FormatError
from nncompress.formats import layer_types as layer_types_module
from nncompress.formats.arch import module_spec
from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    float_arg,
    layer_types,
    positive_arg,
    type_name_of,
)

FORMATS_DIR = Path(__file__).resolve().parents[1] / "src" / "nncompress" / "formats"
#: packages the container must never import (they register into it instead)
FORBIDDEN = ("nncompress.lowrank", "nncompress.share", "nncompress.prune", "nncompress.quant",
             "nncompress.modules")

#: every type the old central table held, with its args in the order compact records
#: (format version 2) write them: changing one would break existing files
OLD_TABLE_ORDER: dict[str, list[str]] = {
    "Linear": ["in_features", "out_features", "bias"],
    "Conv1d": ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "bias", "padding_mode"],
    "Conv2d": ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "bias", "padding_mode"],
    "BatchNorm1d": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "BatchNorm2d": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "LayerNorm": ["normalized_shape", "eps", "elementwise_affine", "bias"],
    "GroupNorm": ["num_groups", "num_channels", "eps", "affine"],
    "InstanceNorm1d": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "InstanceNorm2d": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "RMSNorm": ["normalized_shape", "eps", "elementwise_affine"],
    "Embedding": ["num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"],
    "Identity": [],
    "GRU": ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
            "bidirectional"],
    "LSTM": ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional", "proj_size"],
    "RNN": ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
            "bidirectional", "nonlinearity"],
    "LowRankLinear": ["in_features", "out_features", "rank", "bias"],
    "LowRankConv1d": ["rank", "in_channels", "out_channels", "kernel_size", "stride",
                      "padding", "dilation", "bias", "padding_mode"],
    "LowRankConv2d": ["rank", "in_channels", "out_channels", "kernel_size", "stride",
                      "padding", "dilation", "bias", "padding_mode"],
    "LowRankRNN": ["mode", "input_size", "rank", "hidden_size", "bias", "batch_first",
                   "proj_size"],
    "HashedLinear": ["in_features", "out_features", "buckets", "seed", "bias"],
    "HashedEmbedding": ["num_embeddings", "embedding_dim", "buckets", "seed", "padding_idx"],
    "SplitMultiheadAttention": ["embed_dim", "num_heads", "head_dim", "kdim", "vdim", "bias",
                                "dropout", "batch_first"],
    "SplitTransformerEncoderLayer": ["d_model", "nhead", "dim_feedforward", "dropout_p",
                                     "activation_name", "layer_norm_eps", "batch_first",
                                     "norm_first", "bias"],
    "ModuleList": ["children"],
    "Sequential": ["children"],
    "ReLU": [], "Tanh": [], "Sigmoid": [],
    "GELU": ["approximate"],
    "LeakyReLU": ["negative_slope"],
    "Flatten": ["start_dim", "end_dim"],
    "Dropout": ["p"],
    "AdaptiveAvgPool1d": ["output_size"],
    "MaxPool1d": ["kernel_size", "stride", "padding"],
    "AvgPool1d": ["kernel_size", "stride", "padding"],
}


def _imported_modules(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names (lazy ones inside functions
    too; relative imports resolved), plus literal ``import_module("...")`` arguments."""
    package = f"nncompress.formats.{path.stem}".rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.append(str(node.args[0].value))
    return names


def test_no_formats_module_imports_a_technique_or_layer_package() -> None:
    files = sorted(FORMATS_DIR.glob("*.py"))
    assert len(files) > 10 and FORMATS_DIR / "arch.py" in files
    offending = [(f.name, name) for f in files for name in _imported_modules(f)
                 if any(name == p or name.startswith(f"{p}.") for p in FORBIDDEN)]
    assert offending == []


def test_import_statement_scan_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..lowrank.layers import LowRankLinear\n"
                     "    import nncompress.share.hashing\n")
    names = _imported_modules(probe)
    assert "nncompress.lowrank.layers" in names and "nncompress.share.hashing" in names


def test_importing_formats_loads_no_technique_package() -> None:
    code = ("import sys, nncompress.formats\n"
            f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_registered_args_keep_the_old_table_order() -> None:
    table = layer_types()
    assert set(OLD_TABLE_ORDER) <= set(table.names())
    assert {n: list(table.get(n).args) for n in OLD_TABLE_ORDER} == OLD_TABLE_ORDER


def test_each_layer_type_is_registered_beside_its_class() -> None:
    table = layer_types()
    homes = {name: table.get(name).cls.__module__ for name in OLD_TABLE_ORDER}
    assert homes["LowRankRNN"] == "nncompress.lowrank.layers"
    assert homes["HashedEmbedding"] == "nncompress.share.hashed_layers"
    assert homes["SplitMultiheadAttention"] == "nncompress.modules.attention"
    assert homes["Linear"].startswith("torch.nn.")
    assert type_name_of(nn.Linear) == "Linear" and type_name_of(nn.Module) is None


class ScaledLinear(nn.Linear):
    """A Linear whose output is multiplied by a constant: a layer type only this test
    module knows about."""

    def __init__(self, in_features: int, out_features: int, scale: float,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


SCALED = "TestFormatsLayerTypes.ScaledLinear"


@pytest.fixture
def scaled_linear() -> Iterator[str]:
    """``ScaledLinear`` registered under a unique name, removed again afterwards."""
    assert SCALED not in LAYER_TYPES
    LAYER_TYPES.register(SCALED, LayerType(ScaledLinear, {
        "in_features": positive_arg, "out_features": positive_arg, "scale": float_arg,
        "bias": bool_arg}))
    try:
        yield SCALED
    finally:
        LAYER_TYPES._items.pop(SCALED, None)  # the registry's own dict: tests only


def test_a_layer_type_registered_elsewhere_roundtrips(tmp_path: Path,
                                                      scaled_linear: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 3, scale=0.5, bias=False)).eval()
    assert module_spec(model[0]) == {"type": scaled_linear, "args": {
        "in_features": 4, "out_features": 3, "scale": 0.5, "bias": False}}
    formats.save(model, tmp_path / "s.nnc")
    loaded = formats.load(tmp_path / "s.nnc", skeleton=nn.Sequential(nn.Linear(4, 5)))
    assert type(loaded[0]) is ScaledLinear and loaded[0].scale == 0.5
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
    LAYER_TYPES._items.pop(scaled_linear)  # unknown again: the file's record is refused
    with pytest.raises(FormatError, match=r"records type 'TestFormatsLayerTypes\.ScaledLinear' "
                                          r"with args"):
        formats.load(tmp_path / "s.nnc", skeleton=nn.Sequential(nn.Linear(4, 5)))


def test_the_fixture_left_the_registry_as_it_found_it() -> None:
    assert SCALED not in layer_types()


def test_a_listed_package_that_does_not_exist_is_skipped(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    before = layer_types().names()
    monkeypatch.setattr(layer_types_module, "LAYER_PACKAGES", (
        *layer_types_module.LAYER_PACKAGES, "nncompress.quant.no_such_layers",
        "nnc_no_such_package.layers"))
    assert layer_types().names() == before


@pytest.mark.parametrize(("source", "error", "match"), [
    ("import nnc_no_such_dependency\n", ModuleNotFoundError, "nnc_no_such_dependency"),
    ("raise ImportError('broken build')\n", ImportError, "broken build"),
    ("raise RuntimeError('bad registration')\n", RuntimeError, "bad registration"),
])
def test_any_other_import_error_of_a_layer_package_propagates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
        error: type[Exception], match: str) -> None:
    (tmp_path / "nnc_broken_layers.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(layer_types_module, "LAYER_PACKAGES", ("nnc_broken_layers",))
    with pytest.raises(error, match=match):
        layer_types()
    assert "nnc_broken_layers" not in sys.modules
