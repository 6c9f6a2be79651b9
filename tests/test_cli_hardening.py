"""Issue #8, part B: the command line with hostile surroundings and bad values.

A ``numpy.py`` in the current folder is never executed; names from files are escaped;
FIFOs, devices, sockets and folders are refused before they are read; bad option values
and output paths give one line and exit status 2, never "internal error"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_cli
from nncompress import api, cli
from nncompress.cli_inputs import printable
from nncompress.models.mlp import MLP

DATA = textwrap.dedent('''
    import torch

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 16, generator=g)
        y = x[:, 0, :3].argmax(dim=1)
        return x[:48], y[:48], x[48:], y[48:]
''')
HOSTILE = ("numpy", "torch", "yaml", "pydantic", "argparse", "json", "tqdm")


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cwd: a data module (``hardata``) and a tiny saved model."""
    (tmp_path / "hardata.py").write_text(DATA)
    torch.manual_seed(0)
    api.save(MLP((1, 16), 3, hidden=(8,)), tmp_path / "tiny.nnc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def watchdog() -> Iterator[None]:
    """Fail instead of hanging when a FIFO is opened after all."""
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError("the CLI blocked on a non-regular file")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)




def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nncompress: error: "), err
    assert "internal error" not in err
    return lines[0]


# --------------------------------------------------------------------------- sys.path


@pytest.mark.parametrize("launcher", ["script", "module"])
def test_modules_in_the_current_folder_never_shadow_ours(work: Path, launcher: str) -> None:
    """numpy.py, torch.py, yaml.py, ... in the cwd would write a marker when imported; the
    user's own data module there is still found (appended to sys.path for that import)."""
    for name in HOSTILE:
        (work / f"{name}.py").write_text(
            f"open({str(work / ('MARKER-' + name))!r}, 'w').close()\n")
    script = Path(sys.executable).with_name("nncompress")
    if launcher == "script" and not script.exists():
        pytest.skip("no nncompress console script next to the interpreter")
    cmd = [str(script)] if launcher == "script" else [sys.executable, "-m", "nncompress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([*cmd, "eval", "tiny.nnc", "--data", "hardata:load", "--json",
                           "--no-latency"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert '"accuracy"' in done.stdout
    assert sorted(p.name for p in work.glob("MARKER-*")) == []


def test_main_keeps_the_current_folder_off_sys_path_and_restores_it(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert [p for p in cli._without_cwd(["", str(work), f"{work}/.", "/usr/lib"])] == \
        ["/usr/lib"]
    before = list(sys.path)
    sys.path.insert(0, "")
    try:
        code, out, _ = run_cli(capsys, "recipes")
        assert code == 0 and "magnitude-prune" in out
        assert sys.path[0] == ""            # restored for a caller in the same process
    finally:
        sys.path[:] = before


# --------------------------------------------------------------------------- escaping


def evil_model() -> nn.Module:
    """Module names a terminal would obey: an ANSI colour and a right-to-left override."""
    model = nn.Module()
    model.add_module("\x1b[31mred\x1b[0m", nn.Linear(2, 2))
    model.add_module("\u202eevil", nn.Linear(2, 2))
    return model


def test_inspect_escapes_names_from_the_file(work: Path, capsys) -> None:
    api.save(evil_model(), work / "evil.nnc")
    code, out, err = run_cli(capsys, "inspect", "evil.nnc")
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[31mred\\x1b[0m.weight" in out and "\\u202eevil.weight" in out
    code, out, _ = run_cli(capsys, "inspect", "evil.nnc", "--json")
    assert code == 0 and "\x1b" not in out and "\\u001b[31mred" in out


def test_lone_surrogates_are_escaped_not_an_internal_error(work: Path, capsys) -> None:
    """An undecodable file name arrives as a lone surrogate (surrogateescape); printing
    one to a UTF-8 stream raised UnicodeEncodeError ("internal error")."""
    line = one_line_error(capsys, "inspect", "bad\udcffname.nnc")
    assert "bad\\udcffname.nnc" in line and "\udcff" not in line
    (work / "noop.yaml").write_text("name: noop\nstages: [{evaluate: {}}]\n")
    code, out, err = run_cli(capsys, "compress", "--model", "tiny.nnc", "--data",
                             "hardata:load", "--recipe", "noop.yaml", "--out",
                             "out\udcff.nnc", "--no-progress", "--no-latency")
    assert code == 0, err
    assert "saved" in out and "out\\udcff.nnc" in out and "\udcff" not in out
    assert printable("a\udcffb\x1b[0m\u202e\U000e0001\n") == \
        "a\\udcffb\\x1b[0m\\u202e\\U000e0001\\x0a"
    assert printable("table\nrow", newlines=True) == "table\nrow"


def test_errors_quoting_file_content_are_escaped(work: Path, capsys) -> None:
    api.save(evil_model(), work / "evil.nnc")
    (work / "skel_evil.py").write_text("from torch import nn\n"
                                       "class Net(nn.Module):\n"
                                       "    def __init__(self):\n"
                                       "        super().__init__()\n"
                                       "        self.fc = nn.Linear(2, 2)\n")
    line = one_line_error(capsys, "eval", "evil.nnc", "--model-class", "skel_evil:Net",
                          "--data", "hardata:load", "--no-latency")
    assert "\x1b" not in line and "\udcff" not in line and "\\x1b[31mred" in line


# --------------------------------------------------------------------------- files


@pytest.mark.usefixtures("watchdog")
def test_fifos_devices_sockets_and_folders_are_refused(work: Path, capsys) -> None:
    os.mkfifo(work / "pipe.nnc")
    os.mkfifo(work / "pipe.yaml")
    os.mkfifo(work / "pipemod.py")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(work / "sock.nnc"))
        for argv, needle in [
            (("inspect", "pipe.nnc"), "model file 'pipe.nnc' is a FIFO (named pipe)"),
            (("inspect", "/dev/zero"), "model file '/dev/zero' is a character device"),
            (("inspect", "sock.nnc"), "model file 'sock.nnc' is a socket"),
            (("inspect", "."), "model file '.' is a folder"),
            (("eval", "pipe.nnc", "--data", "hardata:load"), "is a FIFO"),
            (("compress", "--model", "pipe.nnc", "--data", "hardata:load", "--recipe",
              "magnitude-prune", "--out", "o.nnc"), "is a FIFO"),
            (("compress", "--model", "tiny.nnc", "--data", "hardata:load", "--recipe",
              "pipe.yaml", "--out", "o.nnc"), "recipe file 'pipe.yaml' is a FIFO"),
            # Python's own finder skips a module file that is not a regular file
            (("eval", "tiny.nnc", "--data", "pipemod:load"), "no module named 'pipemod'"),
            (("compress", "--model", "tiny.nnc", "--data", "hardata:load", "--recipe",
              "magnitude-prune", "--out", "pipe.nnc"), "--out: 'pipe.nnc' is a FIFO"),
        ]:
            assert needle in one_line_error(capsys, *argv), argv
    assert not (work / "o.nnc").exists()


def test_files_that_are_not_nnc_files(work: Path, capsys) -> None:
    (work / "notes.txt").write_text("hello\n")
    assert "notes.txt" in one_line_error(capsys, "inspect", "notes.txt")
    assert "notes.txt" in one_line_error(capsys, "eval", "notes.txt", "--data",
                                         "hardata:load")
    assert "model 'nothing-here' is neither an existing .nnc file" in one_line_error(
        capsys, "inspect", "nothing-here")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(("argv", "needle"), [
    (("train", "--model", "mlp", "--epochs", "-1", "--out", "m.nnc"),
     "--epochs must be >= 1 (got -1)"),
    (("train", "--model", "mlp", "--epochs", "0", "--out", "m.nnc"), "--epochs must be >= 1"),
    (("train", "--model", "mlp", "--epochs", "lots", "--out", "m.nnc"),
     "--epochs must be an integer (got 'lots')"),
    (("train", "--model", "mlp", "--seed", "-1", "--out", "m.nnc"),
     "--seed must be from 0 to 4294967295 (got -1)"),
    (("train", "--model", "mlp", "--seed", "9" * 30, "--out", "m.nnc"), "--seed must be from"),
    (("train", "--model", "mlp", "--seed", "1.5", "--out", "m.nnc"), "--seed must be an integer"),
    (("train", "--model", "vgg99", "--out", "m.nnc"), "vgg99"),
    (("train", "--model", "mlp", "--out", "nodir/m.nnc"), "output folder 'nodir' does not exist"),
    (("train", "--model", "mlp", "--out", "."), "'.' is a folder"),
    (("demo", "--models", ","), "--models ',': expected comma-separated model names"),
    (("demo", "--models", "mlp,,cnn1d"), "an empty name"),
    (("demo", "--models", "mlp,mlp"), "--models names 'mlp' twice"),
    (("demo", "--models", "mlp,vgg99", "--out", "r"), "vgg99"),
    (("demo", "--out", "tiny.nnc"), "report folder 'tiny.nnc' exists and is not a folder"),
    (("demo", "--out", "nodir/report"), "the folder 'nodir' does not exist"),
    (("demo", "--out", "tiny.nnc/report"), "the folder 'tiny.nnc' is not a folder"),
    (("demo", "--out", "/proc/nncompress-report", "--models", "mlp"),
     "cannot create the report folder '/proc/nncompress-report'"),
    (("demo", "--out", "."), "is the current folder or one above it"),
    (("demo", "--out", ".."), "is the current folder or one above it"),
    (("demo", "--out", "cache-like"), "holds files that are not an nncompress report"),
    (("compress", "--model", "mlp", "--recipe", "no-such-recipe", "--out", "o.nnc"),
     "unknown recipe 'no-such-recipe'"),
    (("compress", "--model", "mlp", "--model-class", "x:Y", "--recipe", "magnitude-prune",
      "--out", "o.nnc"), "--model-class is for a .nnc file"),
])
def test_bad_values_give_one_line(work: Path, capsys, argv: tuple[str, ...],
                                  needle: str) -> None:
    (work / "cache-like").mkdir()
    (work / "cache-like" / "precious.txt").write_text("keep me")
    assert needle in one_line_error(capsys, *argv)
    assert not (work / "m.nnc").exists() and not (work / "o.nnc").exists()
    assert not (work / "r").exists() and not list(work.glob(".*.tmp"))
    assert (work / "cache-like" / "precious.txt").read_text() == "keep me"
