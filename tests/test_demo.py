"""The main job on its smallest setting: one model, quick training, a full report folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nncompress import cli


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
