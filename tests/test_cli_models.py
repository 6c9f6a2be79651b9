"""Issue #8, part C: a user's own model on the command line. ``--model module:function``
for compress / eval / inspect, ``--model-class module:Class`` for a ``.nnc`` file of a
user model, and errors phrased for a CLI user (never ``skeleton=``)."""

from __future__ import annotations

import importlib
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import run_cli, user_module
from nncompress import api, formats

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                                      nn.Linear(32, 3))

        def forward(self, x):
            return self.body(x)

    def build():
        torch.manual_seed(0)
        return Net()

    def sparse():
        """Net with 90 % of the first layer's weights zero: not stored dense."""
        net = build()
        with torch.no_grad():
            w = net.body[1].weight
            w[torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.9] = 0
        return net

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 1, 16, generator=g)
        y = x[:, 0, :3].argmax(dim=1)
        return x[:64], y[:64], x[64:], y[64:]

    def not_a_model():
        return 3

    def needs_args(width):
        return Net()

    def explodes():
        raise RuntimeError("weights missing")

    NUMBER = 7
''')


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user module with a unique name in the cwd."""
    yield from user_module(tmp_path, monkeypatch, "usermodels", MODULE)


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("nncompress: error: "), err
    return err.strip()


def test_inspect_a_function_shows_what_save_would_write(user: str, capsys,
                                                        tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", f"{user}:sparse")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("body.")}
    assert set(rows) == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}
    # the same encodings as the file nc.save writes for this model
    api.save(importlib.import_module(user).sparse(), tmp_path / "ref.nnc")
    expected = {t.name: t.encoding for t in formats.inspect(tmp_path / "ref.nnc").tensors}
    assert {name: row[3] for name, row in rows.items()} == expected
    assert expected["body.1.weight"] != "dense"
    assert "as nc.save writes it: format version" in out
    code, out, _ = run_cli(capsys, "inspect", "--model", f"{user}:build", "--json")
    assert code == 0 and json.loads(out)["arch"]["builder"]["class"] == f"{user}.Net"


def test_eval_and_compress_a_function(user: str, capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "eval", f"{user}:build", "--data", f"{user}:load",
                             "--no-latency", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert figures["params"] == 16 * 32 + 32 + 32 * 3 + 3 and 0 <= figures["accuracy"] <= 1
    code, out, err = run_cli(capsys, "compress", "--model", f"{user}:build", "--data",
                             f"{user}:load", "--recipe", "magnitude-prune", "--out",
                             "small.nnc", "--no-progress", "--no-latency")
    assert code == 0, err
    assert "saved" in out and (tmp_path / "small.nnc").stat().st_size > 0


def test_a_user_nnc_needs_model_class(user: str, capsys, tmp_path: Path) -> None:
    module = importlib.import_module(user)
    api.save(module.sparse(), tmp_path / "net.nnc")
    for argv in (("eval", "net.nnc", "--data", f"{user}:load", "--no-latency"),
                 ("compress", "--model", "net.nnc", "--data", f"{user}:load", "--recipe",
                  "magnitude-prune", "--out", "o.nnc")):
        line = one_line_error(capsys, *argv)
        assert f"'net.nnc' holds a user model of class {user}.Net" in line
        assert "--model-class" in line and "skeleton" not in line
    code, out, err = run_cli(capsys, "eval", "net.nnc", "--model-class", f"{user}:Net",
                             "--data", f"{user}:load", "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(out)["nonzero_params"] < json.loads(out)["params"]
    code, out, err = run_cli(capsys, "compress", "--model", "net.nnc", "--model-class",
                             f"{user}:Net", "--data", f"{user}:load", "--recipe",
                             "magnitude-prune", "--out", "o.nnc", "--no-progress",
                             "--no-latency")
    assert code == 0, err
    reloaded = api.load(tmp_path / "o.nnc", skeleton=module.Net())
    assert isinstance(reloaded, torch.nn.Module)
    code, out, _ = run_cli(capsys, "inspect", "net.nnc")     # inspect needs no class
    assert code == 0 and "body.1.weight" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (("inspect", "{u}:not_a_model"), "--model '{u}:not_a_model' returned int, not a "
                                     "torch.nn.Module"),
    (("inspect", "{u}:needs_args"), "--model '{u}:needs_args' must take no arguments"),
    (("inspect", "{u}:explodes"), "raised RuntimeError: weights missing"),
    (("inspect", "{u}:NUMBER"), "--model '{u}:NUMBER' is not a function"),
    (("inspect", "{u}:missing"), "'{u}' has no attribute 'missing'"),
    (("inspect", "nosuchmodule_xyz:build"), "no module named 'nosuchmodule_xyz'"),
    (("inspect", "{u}:build", "--model", "{u}:build"), "give the model once"),
    (("inspect",), "give the model once"),
    (("eval", "{u}:build", "--model-class", "{u}:Net", "--data", "{u}:load"),
     "--model-class is for a .nnc file"),
    (("eval", "net.nnc", "--model-class", "{u}:build", "--data", "{u}:load"),
     "--model-class '{u}:build' is not a torch.nn.Module subclass"),
    (("eval", "net.nnc", "--model-class", "not a reference", "--data", "{u}:load"),
     "is not a reference of the form package.module:name"),
    (("compress", "--model", "{u}:build", "--recipe", "magnitude-prune", "--out", "o.nnc"),
     "--data is required with --model '{u}:build'"),
])
def test_user_model_errors(user: str, capsys, tmp_path: Path, argv: tuple[str, ...],
                           needle: str) -> None:
    api.save(torch.nn.Linear(2, 2), tmp_path / "net.nnc")
    line = one_line_error(capsys, *(a.format(u=user) for a in argv))
    assert needle.format(u=user) in line
    assert not (tmp_path / "o.nnc").exists()
