"""The multi-model subcommands end to end on tiny, quickly trained models: ``zip``,
``cascade``, ``router`` and ``branches`` write one ``.nnc`` that loads back and gives the
accuracies they report; bad input is one line and exit 2; pickle-based model files are
refused by name; ``techniques`` lists the methods."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from nncompress import api, cli, formats
from nncompress.data import class_subset, holdout, load_dataset
from nncompress.errors import RecipeError
from nncompress.measure import accuracy, count_params
from nncompress.models.mlp import MLP
from nncompress.share.composite import BranchesModel, CascadeModel, MultiplexerModel
from nncompress.share.zipped import ZippedPair
from nncompress.technique import all_techniques
from nncompress.train import fit

DATA = textwrap.dedent('''
    import torch

    def load():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(320, 1, 16, generator=g)
        y = x[:, 0, :4].argmax(dim=1)
        return x[:256], y[:256], x[256:], y[256:]

    def narrow():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(80, 1, 10, generator=g)
        y = x[:, 0, :2].argmax(dim=1)
        return x[:64], y[:64], x[64:], y[64:]
''')

MODELS = textwrap.dedent('''
    import torch
    from nncompress import models

    def gru():
        return models.build("gru", (1, 16), 2, hidden=4, num_layers=1)

    def user():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
''')

ZIP_TASKS = ("--data", "multidata:load", "--tasks", "0,1", "2,3")


def _trained(model: MLP, data, seed: int) -> MLP:
    torch.manual_seed(seed)
    fit(model, data, epochs=3, lr=1e-2, seed=seed, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data and model modules and tiny trained models, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("multi")
    (root / "multidata.py").write_text(DATA)
    (root / "multimodels.py").write_text(MODELS)
    import sys
    sys.path.insert(0, str(root))
    try:
        data = load_dataset("multidata:load", seed=0)
    finally:
        sys.path.remove(str(root))
    tasks = class_subset(data, [0, 1]), class_subset(data, [2, 3])
    torch.manual_seed(0)
    for name, task, seed in (("a", tasks[0], 1), ("b", tasks[1], 2)):
        api.save(_trained(MLP((1, 16), 2, hidden=(16, 8)), task, seed), root / f"{name}.nnc")
    rest, _ = holdout(data, 0.25, seed=0)  # what --held-out 0.25 --seed 0 holds out
    api.save(_trained(MLP((1, 16), 4, hidden=(4,)), rest, 3), root / "small.nnc")
    api.save(_trained(MLP((1, 16), 4, hidden=(64,)), rest, 4), root / "big.nnc")
    api.save(_trained(MLP((1, 16), 4, hidden=(16,)), data, 5), root / "full.nnc")
    api.save(MLP((1, 10), 4, hidden=(8,)), root / "narrow.nnc")
    return root


@pytest.fixture
def work(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(folder / "cache"))
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main([*argv, "--no-progress"] if argv[0] not in ("eval", "techniques")
                    else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _data():
    return load_dataset("multidata:load", seed=0)


def _accuracies_in_range(report: dict) -> None:
    for row in report["rows"]:
        assert all(a is None or 0.0 <= a <= 1.0 for a in row["accuracy"]), row
        assert row["params"] > 0 and row["macs"] > 0 and row["file_bytes"] > 0


# --------------------------------------------------------------------------- end to end


def test_zip_writes_one_file_that_answers_both_tasks(work: Path, capsys) -> None:
    report = run_json(capsys, "zip", "--model-a", "a.nnc", "--model-b", "b.nnc", *ZIP_TASKS,
                      "--share", "1.0,0.5", "--retrain-epochs", "1", "--final-epochs", "1",
                      "--out", "zipped.nnc")
    _accuracies_in_range(report)
    separate, zipped = report["rows"]
    assert zipped["params"] < separate["params"] and zipped["macs"] < separate["macs"]
    model = api.load(work / "zipped.nnc")
    assert isinstance(model, ZippedPair)
    assert count_params(model).total == zipped["params"]
    assert report["bytes"] == (work / "zipped.nnc").stat().st_size
    data = _data()
    again = [accuracy(model.task(i), class_subset(data, c).test)
             for i, c in enumerate(([0, 1], [2, 3]))]
    assert again == pytest.approx(zipped["accuracy"], abs=1e-12)
    # eval measures one task of the file, on the classes it was cut from
    code, out, err = run_cli(capsys, "eval", "zipped.nnc", "--data", "multidata:load",
                             "--task", "1", "--classes", "2,3", "--json", "--no-latency")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(zipped["accuracy"][1], abs=1e-12)


def test_zip_table_and_reference_model_names(work: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "zip", "--model-a", "mlp", "--model-b", "b.nnc",
                             *ZIP_TASKS, "--epochs", "1", "--retrain-epochs", "0",
                             "--final-epochs", "1", "--out", "zipped-mlp.nnc")
    assert code == 0, err
    header, _, separate, zipped = out.splitlines()[:4]
    assert "test accuracy multidata:load[0,1]" in header
    assert "test accuracy multidata:load[2,3]" in header
    assert separate.startswith("two separate models") and zipped.startswith("zipped (share 1)")
    assert all(cell.count("%") == 2 for cell in (separate, zipped))
    assert f"saved {(work / 'zipped-mlp.nnc').stat().st_size} bytes" in out
    assert isinstance(api.load(work / "zipped-mlp.nnc"), ZippedPair)


@pytest.mark.parametrize("command, kind", [("cascade", CascadeModel),
                                           ("router", MultiplexerModel)])
def test_multiplexers_write_one_file_with_every_model(work: Path, capsys, command: str,
                                                      kind: type) -> None:
    extra = ("--router-epochs", "5") if command == "router" else ()
    out = f"{command}.nnc"
    report = run_json(capsys, command, "--models", "small.nnc,big.nnc", "--data",
                      "multidata:load", "--budget-macs", "80%", "--held-out", "0.25",
                      *extra, "--out", out)
    _accuracies_in_range(report)
    small, big, both = report["rows"]
    assert [small["label"], big["label"]] == ["small.nnc", "big.nnc"]
    assert small["macs"] <= both["macs"] <= small["macs"] + big["macs"] + 2000
    model = api.load(work / out)
    assert isinstance(model, kind) and len(model.models) == 2
    data = _data()
    assert accuracy(model, data.test) == pytest.approx(both["accuracy"][0], abs=1e-12)
    for member, name in zip(model.models, ("small.nnc", "big.nnc"), strict=True):
        assert torch.equal(member.layers.fc1.weight, api.load(work / name).layers.fc1.weight)
    code, text, err = run_cli(capsys, "eval", out, "--data", "multidata:load", "--json",
                              "--no-latency")
    assert code == 0, err
    figures = json.loads(text)
    assert figures["accuracy"] == pytest.approx(both["accuracy"][0], abs=1e-12)
    assert figures["routed_macs"] == pytest.approx(both["macs"])


def test_reference_models_in_a_cascade_train_without_the_held_out_part(work: Path,
                                                                      capsys) -> None:
    from nncompress import models

    report = run_json(capsys, "cascade", "--models", "small.nnc,mlp", "--data",
                      "multidata:load", "--budget-macs", "30000", "--held-out", "0.25",
                      "--epochs", "2", "--seed", "3", "--out", "cascade-mlp.nnc")
    model = api.load(work / "cascade-mlp.nnc")
    rest, _ = holdout(_data(), 0.25, seed=3)
    expected, _ = models.load("mlp", rest, seed=3, epochs=2, progress=False)
    assert torch.equal(model.models[1].layers.fc1.weight, expected.layers.fc1.weight)
    assert report["rows"][-1]["macs"] <= report["rows"][1]["macs"]
    header = formats.read_header(work / "cascade-mlp.nnc")
    assert header["meta"]["thresholds"] == list(model.thresholds)
    assert header["meta"]["models"] == ["small.nnc", "mlp"]


def test_branches_trains_one_head_per_task(work: Path, capsys) -> None:
    report = run_json(capsys, "branches", "--backbone", "full.nnc", "--data",
                      "multidata:load", "--tasks", "0,1", "2,3", "--head-epochs", "2",
                      "--out", "branches.nnc")
    _accuracies_in_range(report)
    model = api.load(work / "branches.nnc")
    assert isinstance(model, BranchesModel) and len(model.heads) == 2
    full = api.load(work / "full.nnc")
    # the backbone is the classifier below its output layer, unchanged
    assert torch.equal(model.backbone.layers.fc1.weight, full.layers.fc1.weight)
    data = _data()
    subsets = [class_subset(data, c) for c in ([0, 1], [2, 3])]
    again = [accuracy(model.branch(t), s.test) for t, s in enumerate(subsets)]
    assert again == pytest.approx(report["rows"][-1]["accuracy"], abs=1e-12)
    restricted = [accuracy(_Restricted(full, c), s.test)
                  for c, s in zip(([0, 1], [2, 3]), subsets, strict=True)]
    assert restricted == pytest.approx(report["rows"][0]["accuracy"], abs=1e-12)


class _Restricted(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.classes]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, needle", [
    (("zip", "--model-a", "vgg99", "--model-b", "b.nnc", *ZIP_TASKS), "unknown model 'vgg99'"),
    (("zip", "--model-a", "multimodels:gru", "--model-b", "b.nnc", *ZIP_TASKS),
     "layer 'layers.0': GRU is not Linear/Conv1d/Conv2d"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", "--data", "multidata:load",
      "--tasks", "0,1"), "exactly two tasks (got 1)"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", "--data-a", "multidata:load"),
     "give --data-a and --data-b"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", "--data-a", "multidata:load",
      "--data-b", "multidata:narrow"), "the tasks must share an input"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", *ZIP_TASKS, "--share", "1.5"),
     "--share must be in [0, 1] (got 1.5)"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", "--data", "multidata:load",
      "--tasks", "3-1", "0,1"), "expected classes such as 0-4"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", "--data", "multidata:load",
      "--tasks", "0,1", "2,9"), "classes [9] are not in dataset"),
    (("zip", "--model-a", "a.nnc", "--model-b", "b.nnc", *ZIP_TASKS, "--epochs", "2"),
     "none is given"),
    (("cascade", "--models", "small.nnc,narrow.nnc", "--data", "multidata:load",
      "--budget-macs", "1e6"), "model 'narrow.nnc' does not take"),
    (("cascade", "--models", "small.nnc,big.nnc", "--data", "multidata:load",
      "--budget-macs", "1"), "budget of 1 MACs per sample is below the cheapest"),
    (("router", "--models", "small.nnc,big.nnc", "--data", "multidata:load",
      "--budget-macs", "10"), "below the router"),
    (("cascade", "--models", "big.nnc,small.nnc", "--data", "multidata:load",
      "--budget-macs", "50%"), "give the models cheapest first; MACs per input: big.nnc"),
    (("cascade", "--models", "multimodels:user,big.nnc", "--data", "multidata:load",
      "--budget-macs", "50%"), "is a user model"),
    (("cascade", "--models", "small.nnc", "--data", "multidata:load", "--budget-macs", "5"),
     "expected two or more comma-separated models"),
    (("cascade", "--models", "small.nnc,big.nnc", "--data", "multidata:load",
      "--budget-macs", "lots"), "--budget-macs must be a number"),
    (("router", "--models", "small.nnc,big.nnc", "--data", "multidata:load",
      "--budget-macs", "50%", "--held-out", "1"), "--held-out must be in (0, 1)"),
    (("branches", "--backbone", "full.nnc", "--data", "multidata:load", "multidata:load",
      "--tasks", "0,1", "2,3"), "--tasks cuts tasks from one --data (got 2 datasets)"),
    (("branches", "--backbone", "nope.nnc", "--data", "multidata:load"),
     "'nope.nnc' does not exist"),
])
def test_bad_input_is_one_line(work: Path, capsys, argv: tuple[str, ...],
                               needle: str) -> None:
    code, _, err = run_cli(capsys, *argv, "--out", "bad.nnc")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nncompress: error: "), err
    assert needle in lines[0], lines[0]
    assert not (work / "bad.nnc").exists()


def test_eval_of_a_two_task_file_needs_task(work: Path, capsys) -> None:
    run_json(capsys, "zip", "--model-a", "a.nnc", "--model-b", "b.nnc", *ZIP_TASKS,
             "--retrain-epochs", "0", "--final-epochs", "0", "--out", "z0.nnc")
    for extra, needle in (((), "answers 2 tasks; give --task 0 to 1"),
                          (("--task", "2"), "(got 2)")):
        code, _, err = run_cli(capsys, "eval", "z0.nnc", "--data", "multidata:load", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    code, _, err = run_cli(capsys, "eval", "small.nnc", "--data", "multidata:load",
                           "--task", "0")
    assert code == 2 and "answers one" in err, err


# --------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("suffix", [".pt2", ".pt", ".pth", ".PT"])
@pytest.mark.parametrize("argv", [
    ("eval", "{m}", "--data", "multidata:load"),
    ("inspect", "{m}"),
    ("compress", "--model", "{m}", "--data", "multidata:load", "--recipe", "magnitude-prune",
     "--out", "o.nnc"),
    ("train", "--model", "{m}", "--out", "o.nnc"),
    ("zip", "--model-a", "{m}", "--model-b", "b.nnc", *ZIP_TASKS, "--out", "o.nnc"),
    ("cascade", "--models", "small.nnc,{m}", "--data", "multidata:load", "--budget-macs",
     "50%", "--out", "o.nnc"),
])
def test_pickle_based_model_files_are_refused_unread(work: Path, capsys, suffix: str,
                                                     argv: tuple[str, ...]) -> None:
    name = f"model{suffix}"
    (work / name).write_bytes(b"\x80\x04 not to be unpickled")
    argv = tuple(a.replace("{m}", name) for a in argv)
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    line, = err.strip().splitlines()
    assert f"'{name}'" in line and f"does not load {suffix.lower()} files" in line
    assert "never unpickles" in line and "nncompress.save" in line
    assert "weights_only=True" in line and "package.module:function" in line
    assert not (work / "o.nnc").exists()


def test_a_missing_pt2_is_refused_the_same_way(work: Path, capsys) -> None:
    code = cli.main(["eval", "gone.pt2", "--data", "multidata:load"])
    err = capsys.readouterr().err
    assert code == 2 and "torch.export.load unpickles" in err, err


# --------------------------------------------------------------------------- listings


def test_techniques_lists_the_multi_model_methods(capsys) -> None:
    code, out, _ = run_cli(capsys, "techniques")
    assert code == 0
    single, multi = out.split("methods over several models")
    assert "magnitude_prune" in single and "multi_task_zipping" not in single
    for name, command, paper in (("multi_task_zipping", "zip", "He, Zhou & Thiele (2018)"),
                                 ("confidence_cascade", "cascade", "Eshratifar & Pedram"),
                                 ("learned_router", "router", "Eshratifar & Pedram"),
                                 ("shared_backbone", "branches", "Zhang, Ye & Luo (2019)")):
        line = next(ln for ln in multi.splitlines() if ln.startswith(name))
        assert f"nncompress {command}" in line and paper in line


def test_a_multi_model_method_is_not_a_technique() -> None:
    assert "multi_task_zipping" not in all_techniques()
    with pytest.raises(RecipeError, match=r"'multi_task_zipping' is a multi-model method.*"
                                          r"run it with `nncompress zip`"):
        all_techniques().get("multi_task_zipping")
    with pytest.raises(RecipeError, match="multi_task_zipping"):
        from nncompress.recipe import Recipe
        Recipe.from_yaml("name: r\nstages:\n  - technique: multi_task_zipping\n")


@pytest.mark.parametrize("command", ["zip", "cascade", "router", "branches"])
def test_help_on_each_multi_model_command(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: nncompress" in capsys.readouterr().out
