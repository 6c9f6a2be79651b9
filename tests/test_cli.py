"""The command line: exit codes and one-line errors on bad input, no half-written output,
and one short recipe end to end through ``python -m nncompress`` on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nncompress import api, cli
from nncompress.models.mlp import MLP

DATA_MODULE = textwrap.dedent('''
    import torch

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(160, 1, 16, generator=g)
        y = x[:, 0, :3].argmax(dim=1)
        return x[:128], y[:128], x[128:], y[128:]

    def broken():
        return "not data"
''')

RECIPE = textwrap.dedent('''
    name: tiny-prune
    stages:
      - technique: magnitude_prune
        params: {sparsity: 0.75, scope: global, steps: 2, epochs_per_step: 1, lr: 0.001}
      - fine_tune: {epochs: 1, lr: 0.001}
      - evaluate: {}
''')


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a user data module, a tiny saved model and a recipe; it is the cwd."""
    (tmp_path / "tinydata.py").write_text(DATA_MODULE)
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    torch.manual_seed(0)
    api.save(MLP((1, 16), 3, hidden=(32,)), tmp_path / "tiny.nnc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nncompress: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- bad input


def test_inspect_missing_file(work: Path, capsys) -> None:
    code, _, err = run_cli("inspect", "nope.nnc", capsys=capsys)
    assert_one_line_error(code, err, "nope.nnc")


def test_eval_missing_file(work: Path, capsys) -> None:
    code, _, err = run_cli("eval", "nope.nnc", "--data", "tinydata:load", capsys=capsys)
    assert_one_line_error(code, err, "nope.nnc")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "pickle"])
def test_corrupt_or_hostile_file(work: Path, capsys, damage: str) -> None:
    path = work / "bad.nnc"
    raw = bytearray((work / "tiny.nnc").read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) - 40] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(os.urandom(500))
    else:  # a torch/pickle file handed to us must be refused, never unpickled
        import io
        buf = io.BytesIO()
        torch.save({"x": torch.zeros(3)}, buf)
        raw = bytearray(buf.getvalue())
    path.write_bytes(bytes(raw))
    for argv in (("inspect", str(path)), ("eval", str(path), "--data", "tinydata:load")):
        code, _, err = run_cli(*argv, capsys=capsys)
        assert_one_line_error(code, err, "bad.nnc")


def test_unknown_model(work: Path, capsys) -> None:
    code, _, err = run_cli("compress", "--model", "resnet9000", "--recipe", "tiny.yaml",
                           "--out", "o.nnc", "--no-progress", capsys=capsys)
    assert_one_line_error(code, err, "resnet9000")
    assert not (work / "o.nnc").exists()


def test_unknown_recipe(work: Path, capsys) -> None:
    code, _, err = run_cli("compress", "--model", "tiny.nnc", "--data", "tinydata:load",
                           "--recipe", "no-such-recipe", "--out", "o.nnc", capsys=capsys)
    assert_one_line_error(code, err, "no-such-recipe")
    assert not (work / "o.nnc").exists()


@pytest.mark.parametrize(("stage", "needle"), [
    ("- technique: shrink_ray\n    params: {}", "shrink_ray"),
    ("- technique: magnitude_prune\n    params: {sparsity: 0.5, colour: red}", "colour"),
    ("- technique: magnitude_prune\n    params: {sparsity: lots}", "sparsity"),
    ("- technique: magnitude_prune\n    params: {sparsity: 1.5}", "sparsity"),
])
def test_invalid_recipe(work: Path, capsys, stage: str, needle: str) -> None:
    (work / "bad.yaml").write_text(f"name: bad\nstages:\n  {stage}\n")
    code, _, err = run_cli("compress", "--model", "tiny.nnc", "--data", "tinydata:load",
                           "--recipe", "bad.yaml", "--out", "o.nnc", capsys=capsys)
    assert_one_line_error(code, err, needle)
    assert not (work / "o.nnc").exists()


def test_malformed_yaml(work: Path, capsys) -> None:
    (work / "bad.yaml").write_text("name: [unclosed\n")
    code, _, err = run_cli("compress", "--model", "tiny.nnc", "--data", "tinydata:load",
                           "--recipe", "bad.yaml", "--out", "o.nnc", capsys=capsys)
    assert_one_line_error(code, err, "bad.yaml")


@pytest.mark.parametrize(("ref", "needle"), [
    ("tinydata:broken", "tinydata:broken"),
    ("tinydata:missing", "missing"),
    ("nosuchmodule:load", "nosuchmodule"),
    ("imagenet", "imagenet"),
])
def test_bad_data_reference(work: Path, capsys, ref: str, needle: str) -> None:
    code, _, err = run_cli("eval", "tiny.nnc", "--data", ref, "--no-latency", capsys=capsys)
    assert_one_line_error(code, err, needle)


def test_wrong_shaped_data(work: Path, capsys) -> None:
    (work / "wide.py").write_text(
        "import torch\n"
        "def load():\n"
        "    x = torch.randn(40, 1, 99)\n"
        "    y = torch.zeros(40, dtype=torch.long)\n"
        "    return x, y, x, y\n")
    code, _, err = run_cli("eval", "tiny.nnc", "--data", "wide:load", "--no-latency",
                           capsys=capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "99" in err or "shape" in err


def test_output_folder_missing(work: Path, capsys) -> None:
    code, _, err = run_cli("compress", "--model", "tiny.nnc", "--data", "tinydata:load",
                           "--recipe", "tiny.yaml", "--out", "nodir/o.nnc", capsys=capsys)
    assert_one_line_error(code, err, "nodir")


def test_argparse_errors_are_one_line(capsys) -> None:
    code, _, err = run_cli("compress", capsys=capsys)
    assert_one_line_error(code, err, "--model", "--recipe", "--out",
                          "see 'nncompress compress --help'")
    code, _, err = run_cli("frobnicate\x1b[2J", capsys=capsys)
    assert_one_line_error(code, err, "invalid choice", "frobnicate\\x1b[2J")
    assert "\x1b" not in err


# --------------------------------------------------------------------------- listings


def test_listings(capsys) -> None:
    code, out, _ = run_cli("techniques", capsys=capsys)
    assert code == 0
    assert "magnitude_prune" in out and "pruning" in out and "Han" in out
    code, out, _ = run_cli("models", capsys=capsys)
    assert code == 0
    for name in ("mlp", "cnn1d", "cnn2d", "gru", "lstm", "rescnn", "transformer"):
        assert name in out
    code, out, _ = run_cli("recipes", capsys=capsys)
    assert code == 0 and "magnitude-prune" in out


@pytest.mark.parametrize("command", ["demo", "train", "compress", "eval", "inspect",
                                     "techniques", "models", "recipes"])
def test_help_on_each_command(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: nncompress" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


def test_compress_end_to_end_through_the_cli(work: Path) -> None:
    """A real subprocess, as a user runs it: compress, then inspect and eval the artifact."""
    env = {**os.environ, "NNCOMPRESS_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nncompress", *argv], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    done = run("compress", "--model", "tiny.nnc", "--data", "tinydata:load", "--recipe",
               "tiny.yaml", "--out", "small.nnc", "--no-progress", "--no-latency")
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout
    out = work / "small.nnc"
    assert out.stat().st_size < (work / "tiny.nnc").stat().st_size

    model = api.load(out)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.75, abs=0.01)

    done = run("inspect", "small.nnc", "--json")
    assert done.returncode == 0, done.stderr
    header = json.loads(done.stdout)
    assert header["format_version"] >= 1

    done = run("eval", "small.nnc", "--data", "tinydata:load", "--json", "--no-latency")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert 0.0 <= figures["accuracy"] <= 1.0
    assert figures["file_bytes"] == out.stat().st_size
    assert figures["nonzero_params"] < figures["params"]

    done = run("eval", "missing.nnc", "--data", "tinydata:load")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("nncompress: error:")


@pytest.mark.parametrize("timing", ["measured", "sparse faster", "fc1 sparse faster"])
def test_eval_with_the_sparse_engine_reports_every_linear(work: Path, capsys, timing: str,
                                                         monkeypatch) -> None:
    """The engine's choice depends on timing, so the sparse path is also forced faster (for
    both layers, or for fc1 alone): eval then measures a model holding CSR layers, which
    once failed whenever a loaded machine made the sparse path win."""
    from nncompress.kernels import sparse as engine

    def fake_us(layer, x, repeats) -> float:
        faster = timing == "sparse faster" or layer.out_features == 32
        return 1.0 if faster == isinstance(layer, engine.SparseLinear) else 2.0

    if timing != "measured":
        monkeypatch.setattr(engine, "_median_us", fake_us)
    model = api.load(work / "tiny.nnc")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight[layer.weight.abs() < layer.weight.abs().quantile(0.95)] = 0
    api.save(model, work / "sparse.nnc")
    code, out, err = run_cli("eval", "sparse.nnc", "--data", "tinydata:load", "--no-latency",
                             "--sparsify", "--json", capsys=capsys)
    assert code == 0, err
    engine = json.loads(out)["sparse_engine"]
    assert [row["layer"] for row in engine] == ["layers.fc1", "layers.fc2"]
    assert all(row["choice"] in ("dense", "sparse") for row in engine)
    assert all(row["sparsity"] >= 0.94 for row in engine)
    figures = json.loads(out)
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert figures["file_bytes"] == (work / "sparse.nnc").stat().st_size
    if timing != "measured":
        want = ["sparse", "sparse"] if timing == "sparse faster" else ["sparse", "dense"]
        assert [row["choice"] for row in engine] == want


def test_inspect_entropy_compares_each_huffman_stream(work: Path, capsys) -> None:
    code, out, _ = run_cli("inspect", "tiny.nnc", "--entropy", capsys=capsys)
    assert code == 0 and "no Huffman-coded tensors in this file" in out
    # a shared, heavily pruned weight: 2 centroids, skewed -> Huffman-coded streams
    torch.manual_seed(0)
    model = MLP((1, 16), 3, hidden=(256,))
    with torch.no_grad():
        w = model.layers.fc1.weight
        w.copy_(torch.where(torch.rand(w.shape) < 0.7, 0.0,
                            torch.where(torch.rand(w.shape) < 0.8, 0.5, -0.25)))
    api.save(model, work / "shared.nnc")
    code, out, _ = run_cli("inspect", "shared.nnc", "--entropy", capsys=capsys)
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("layers.fc1.weight ")]
    coded = [ln for ln in lines if "huffman" in ln]
    assert coded, out  # the table row shows a Huffman encoding
    stream_rows = [ln for ln in lines if " %" in ln and ("weights" in ln or "values" in ln)]
    assert stream_rows, out
    for row in stream_rows:
        entropy, huffman = (float(v) for v in row.split()[3:5])
        assert huffman >= entropy  # no prefix code beats the entropy


def test_compress_max_drop_must_be_points(tmp_path, capsys) -> None:
    code = cli.main(["compress", "--model", "mlp", "--recipe", "magnitude-prune",
                     "--out", str(tmp_path / "m.nnc"), "--max-drop", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-drop" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.nnc").exists()
