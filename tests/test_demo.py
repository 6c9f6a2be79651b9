"""The main job on its smallest setting: one model, quick training, a full report folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_data
from nncompress import cli
from nncompress.data import Dataset


def test_quick_demo_writes_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    code = cli.main(["demo", "--quick", "--models", "mlp", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "magnitude-prune" in printed and "baseline (fp32)" in printed
    payload = json.loads((out / "results.json").read_text())
    rows = {r["technique"]: r for r in payload["rows"]}
    assert {"baseline (fp32)", "magnitude-prune"} <= set(rows)
    pruned = rows["magnitude-prune"]
    assert pruned["nonzero_params"] < 0.2 * pruned["params"]
    assert pruned["artifact_bytes"] < rows["baseline (fp32)"]["artifact_bytes"] / 3
    assert (out / "report.md").is_file()
    report = (out / "report.md").read_text()
    # the quick demo runs every demo recipe, deep-compression among them: its stage table
    assert "## deep-compression: bytes per stage" in report
    assert "| layers.fc1.weight |" in report and "after weight_sharing" in report
    # several models at once: mlp's zipping pair (multiplexing needs cnn1d, not run here)
    assert "## Sharing across tasks: multi-task zipping (MTZ)" in report
    assert "| mlp: MTZ share 1 |" in report and "Multiplexing" not in report
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (out / "layer_sparsity.png").stat().st_size > 1000
    # every row's deployed form (float models: ONNX) timed next to eager torch
    assert "## Deployed form vs eager PyTorch" in report
    deployed = {d["technique"]: d for d in payload["deployed"]}
    assert set(deployed) == set(rows)
    for technique, d in deployed.items():
        # the fastest at batch 1 of ONNX and (for compressed rows) the .nnc in PyTorch
        forms = {form for form, _ in d["forms"]}
        assert forms == ({"onnx"} if technique == "baseline (fp32)" else {"onnx", "torch"})
        assert d["form"] in forms and d["b1_ms"] > 0 and d["bn_ms"] > 0, technique
        assert d["b1_ms"] == min(ms for _, ms in d["forms"])
        assert d["eager_b1_ms"] > 0 and d["batch_n"] == 256
    assert (out / "models" / "mlp-magnitude-prune" / "model.onnx").stat().st_size > 1000
    assert "| mlp | magnitude-prune | " in report


def test_demo_rejects_unknown_model(tmp_path: Path, capsys) -> None:
    code = cli.main(["demo", "--models", "mlp,vgg99", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "vgg99" in err
    assert not (tmp_path / "r").exists()


def test_demo_reports_sensitivity_and_refusals(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from nncompress.demo import run_demo

    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    result = run_demo(out, models=["cnn1d", "mlp"], recipes=("network-slimming",),
                      quick=True, progress=False, echo=lambda _msg: None)
    text = (out / "report.md").read_text()
    assert "## Pruning sensitivity (cnn1d)" in text
    assert (out / "sensitivity_cnn1d.png").stat().st_size > 1000
    assert "features.conv2" in text
    # network slimming needs BatchNorm: the MLP refuses it, and the report says so
    assert [(k.model, k.recipe) for k in result.skipped] == [("mlp", "network-slimming")]
    assert "## Not applicable" in text and "BatchNorm" in text
    # with cnn1d in the run: zipping of both pairs and both multiplexers
    assert "| cnn1d: MTZ share 1 |" in text and "| mlp: MTZ share 1 |" in text
    assert "| cascade, budget 35% |" in text and "| learned router, budget 50% |" in text
    # and the KD student and FSKD (the label-free embedder needs the transformer)
    assert "## Knowledge distillation" in text and "| pruned + FSKD (40 inputs" in text
    assert "| student, KD from the teacher |" in text and "Label-free embedder" not in text


def _tiny_int8() -> tuple[torch.nn.Module, Dataset]:
    from nncompress.quant.int8 import QuantizeInt8Config, quantize_int8
    from nncompress.technique import Context

    data = tiny_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3)).eval()
    ctx = Context(data=data, seed=0, progress=False)
    return quantize_int8(model, QuantizeInt8Config(calibration_batches=2), ctx), data


def test_deployed_forms_of_an_int8_model(tmp_path: Path) -> None:
    from nncompress.demo_deploy import deploy_and_time

    model, data = _tiny_int8()
    lat = deploy_and_time(model, data, tmp_path / "m", batch_n=8, threads=1)
    assert {form for form, _ in lat.forms} == {"onnx", "c"} and not lat.notes
    assert lat.form in ("onnx", "c")
    assert lat.b1_ms == dict(lat.forms)[lat.form] == min(ms for _, ms in lat.forms)
    assert lat.bn_ms is not None and lat.bn_ms > 0 and lat.eager_bn_ms > 0 and lat.batch_n == 8
    assert (tmp_path / "m" / "model.onnx").is_file()
    assert (tmp_path / "m" / "c" / "model.c").is_file()


def test_a_form_that_cannot_be_exported_is_a_note(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import nncompress.export as export_pkg
    from nncompress.demo_deploy import deploy_and_time
    from nncompress.errors import UnsupportedLayerError

    def refuse(*_args: object, **_kw: object) -> None:
        raise UnsupportedLayerError("layer 'odd' (Odd) has no export form")

    monkeypatch.setattr(export_pkg, "export", refuse)
    data = tiny_data()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    lat = deploy_and_time(model, data, tmp_path / "m", batch_n=4, threads=1)
    assert lat.form is None and lat.b1_ms is None and lat.bn_ms is None
    assert lat.eager_b1_ms > 0
    assert lat.notes == ("onnx: UnsupportedLayerError: layer 'odd' (Odd) has no export form",)
