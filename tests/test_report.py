"""Report layer: number formatting, tables, result rows and the report folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nncompress import api
from nncompress.data import Dataset
from nncompress.models.mlp import MLP
from nncompress.report import (
    HEADERS,
    ResultRow,
    fmt_bytes,
    fmt_count,
    fmt_ms,
    fmt_pct,
    fmt_ratio,
    render_markdown,
    render_text,
    rows_markdown,
    rows_text,
    write_report,
)


def test_formatters() -> None:
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(2048) == "2.0 KiB"
    assert fmt_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert fmt_count(950) == "950"
    assert fmt_count(1234) == "1.23 k"
    assert fmt_count(2_500_000) == "2.50 M"
    assert fmt_pct(0.941) == "94.10 %"
    assert fmt_pct(-0.012, signed=True) == "-1.20 pt"
    assert fmt_pct(0.0, signed=True) == "+0.00 pt"
    assert fmt_ratio(3.2109) == "3.21x"
    assert fmt_ms(0.12345) == "0.123 ms"
    for fmt in (fmt_bytes, fmt_count, fmt_pct, fmt_ratio, fmt_ms):
        assert fmt(None) == "-"


def test_text_table_aligns_numbers_right_and_text_left() -> None:
    text = render_text(["name", "size"], [["a", "1.0 KiB"], ["longer", "12.0 KiB"]])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "size"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("a ") and lines[2].endswith(" 1.0 KiB")
    assert len(lines[2]) == len(lines[3])


def test_markdown_table_shape() -> None:
    md = render_markdown(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines()
    assert md == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


@pytest.fixture(scope="module")
def measurements():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, generator=g)
    y = x[:, 0, :2].argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    data = Dataset("toy", loader, loader, (1, 8), 2)
    torch.manual_seed(0)
    model = MLP((1, 8), 2, hidden=(16,))
    before = api.measure(model, data, with_latency=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    after = api.measure(model, data, with_latency=True)
    return before, after


def test_result_row_from_measurements(measurements) -> None:
    before, after = measurements
    row = ResultRow.build("mlp", "toy", "half-pruned", before, after)
    assert row.accuracy == after.accuracy
    assert row.accuracy_delta == pytest.approx(after.accuracy - before.accuracy)
    assert row.artifact_bytes == after.artifact_bytes
    assert row.size_ratio == pytest.approx(before.artifact_bytes / after.artifact_bytes)
    assert row.nonzero_params < row.params
    assert row.sparse_macs < row.macs
    assert row.latency_b1_ms is not None and row.latency_b1_ms > 0
    assert row.batch_n is not None and row.batch_n > 1
    assert len(row.cells()) == len(HEADERS)
    assert "half-pruned" in rows_text([row]) and "half-pruned" in rows_markdown([row])


def test_write_report_folder(tmp_path: Path, measurements) -> None:
    before, after = measurements
    rows = [ResultRow.build("mlp", "toy", "baseline (fp32)", before, before),
            ResultRow.build("mlp", "toy", "half-pruned", before, after)]
    out = tmp_path / "rep"
    paths = write_report(out, "Test report", rows, {"mlp / half-pruned": [("fc1", 0.5)]},
                         extra={"note": "x"})
    assert paths.markdown.read_text().startswith("# Test report")
    payload = json.loads(paths.json.read_text())
    assert payload["note"] == "x"
    assert [r["technique"] for r in payload["rows"]] == ["baseline (fp32)", "half-pruned"]
    assert payload["environment"]["threads"] >= 1
    assert len(paths.plots) == 3
    for plot in paths.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plot.name in paths.markdown.read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bytes_breakdown_lists_a_tensor_removed_by_a_later_stage_once() -> None:
    from types import SimpleNamespace

    from nncompress.measure import TensorBytes
    from nncompress.report import breakdown_cells

    def tb(name: str, plain: int, coded: int) -> TensorBytes:
        return TensorBytes(name, 100, 10, plain, "sparse", coded, "sparse")

    def stage(name: str, *weights: TensorBytes) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind="technique",
                               measurement=SimpleNamespace(weights=weights))

    result = SimpleNamespace(
        baseline=SimpleNamespace(weights=(tb("a", 400, 400), tb("b", 400, 400))),
        stages=(stage("prune", tb("a", 100, 90), tb("b", 100, 90)),
                stage("remove", tb("a", 100, 80))))
    result.final = result.stages[-1].measurement
    headers, rows = breakdown_cells(result)
    assert headers[3:6] == ["baseline", "after prune", "after remove"]
    assert [r[0] for r in rows] == ["a", "b", "total"]  # "b" once, though in two stages
    assert rows[1][3:7] == ["400 B", "100 B", "-", "-"]
    assert rows[2][3:8] == ["800 B", "200 B", "100 B", "80 B", "10.00x"]


def test_deployed_section_table_and_notes() -> None:
    from nncompress.demo_deploy import DeployedLatency
    from nncompress.report.deployed import deployed_section, deployed_text

    fast = DeployedLatency("c", 0.01, 0.5, 0.02, 2.0, 256, (("onnx", 0.015), ("c", 0.01)))
    none = DeployedLatency(None, None, None, 0.03, 1.0, 256,
                           notes=("onnx: UnsupportedLayerError: layer 'x' (Odd)",))
    rows = [("cnn1d", "int8", fast), ("mlp", "odd", none)]
    text = deployed_section(rows)
    assert text.startswith("## Deployed form vs eager PyTorch")
    assert "batch N = 256" in text
    assert "| cnn1d | int8 | C (ctypes) | 0.020 ms | 0.010 ms | 2.00x | 2.000 ms | 0.500 ms " \
           "| 4.00x |" in text
    assert "| mlp | odd | none (see notes) | 0.030 ms | - | - | 1.000 ms | - | - |" in text
    assert "- mlp / odd: onnx: UnsupportedLayerError: layer 'x' (Odd)" in text
    terminal = deployed_text(rows)
    assert terminal.splitlines()[0].split()[:3] == ["model", "technique", "deployed"]
    assert "C (ctypes)" in terminal and "none (see notes)" in terminal
    assert fast.to_json()["forms"] == [["onnx", 0.015], ["c", 0.01]]
