"""Issue 11, part 1 on the command line: ``compress --teacher original|none --metric NAME``,
tables that name the metric, ``eval --metric / --teacher``, and user data references that
return inputs only (``(x_train, x_test)`` arrays, or loaders whose batches are ``x``)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import run_cli, user_module
from nncompress import api, cli
from nncompress.cli_help import METRICS_HELP
from nncompress.data import load_dataset
from nncompress.errors import DataError
from nncompress.measure.quality import METRICS
from nncompress.train import reseed_loader

MODULE = textwrap.dedent('''
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    from nncompress import models

    X = torch.randn(96, 1, 16, generator=torch.Generator().manual_seed(0))
    Y = X[:, 0, :3].argmax(dim=1)

    def build():
        torch.manual_seed(0)
        return models.build("mlp", (1, 16), 3, hidden=[24, 12])

    def arrays():
        return X[:64].numpy(), X[64:].numpy()

    def labelled():
        return X[:64], Y[:64], X[64:], Y[64:]

    class Dicts(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"x": X[i]}

    def tensors():
        return (DataLoader(X[:64], batch_size=16, shuffle=True, generator=torch.Generator()),
                DataLoader(X[64:], batch_size=32))

    def one_tuples():
        return (DataLoader(TensorDataset(X[:64]), batch_size=16),
                DataLoader(TensorDataset(X[64:]), batch_size=16))

    def dicts():
        return DataLoader(Dicts(), batch_size=16), DataLoader(Dicts(), batch_size=32)

    def nones():
        pairs = [(x, None) for x in X[:64]]
        collate = lambda b: (torch.stack([x for x, _ in b]), None)
        return (DataLoader(pairs, batch_size=16, collate_fn=collate),
                DataLoader(pairs[:32], batch_size=16, collate_fn=collate))

    def mixed():
        return (DataLoader(X[:64], batch_size=16),
                DataLoader(TensorDataset(X[64:], Y[64:]), batch_size=16))

    def one_each():
        return DataLoader(X[:64], batch_size=16), X[64:].numpy()

    def shapes():
        return X[:64].numpy(), X[64:, :, :8].numpy()
''')

RECIPE = textwrap.dedent('''
    name: prune-and-tune
    stages:
      - technique: magnitude_prune
        params: {sparsity: 0.5, steps: 1, epochs_per_step: 1, lr: 0.001}
      - fine_tune: {epochs: 1, lr: 0.001}
''')


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user module with a unique name in the cwd, and the recipe ``r.yaml`` beside it."""
    yield from user_module(tmp_path, monkeypatch, "userdata", MODULE, {"r.yaml": RECIPE})


def compress(capsys: pytest.CaptureFixture[str], user: str, data: str, *extra: str
             ) -> tuple[int, str, str]:
    return run_cli(capsys, "compress", "--model", f"{user}:build", "--data", f"{user}:{data}",
                   "--recipe", "r.yaml", "--out", "small.nnc", "--no-progress", "--no-latency",
                   *extra)


def error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nncompress: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- user data


@pytest.mark.parametrize("form", ["arrays", "tensors", "one_tuples", "dicts", "nones"])
def test_a_reference_returning_inputs_only_is_an_unlabelled_dataset(user: str,
                                                                     form: str) -> None:
    data = load_dataset(f"{user}:{form}")
    assert not data.labelled and data.num_classes == 0 and data.input_shape == (1, 16)
    for loader in (data.train, data.test):
        batches = list(loader)
        assert all(y is None for _, y in batches)
        xs = [x["x"] if isinstance(x, dict) else x for x, _ in batches]
        assert all(x.shape[1:] == (1, 16) and x.dtype == torch.float32 for x in xs)
    assert sum(len(x["x"] if isinstance(x, dict) else x) for x, _ in data.train) == 64


def test_an_unlabelled_user_loader_keeps_its_shuffle_generator(user: str) -> None:
    """``reseed_loader`` (what training does) still fixes the user loader's order."""
    data = load_dataset(f"{user}:tensors")
    orders = []
    for _ in range(2):
        reseed_loader(data.train, 3)
        orders.append(torch.cat([x for x, _ in data.train]))
    assert torch.equal(orders[0], orders[1])
    reseed_loader(data.train, 4)
    assert not torch.equal(orders[0], torch.cat([x for x, _ in data.train]))


@pytest.mark.parametrize(("form", "words"), [
    ("mixed", "give labels in both or in neither"),
    ("one_each", "not one of each"),
    ("shapes", "train samples are shaped (1, 16) but test samples (1, 8)"),
])
def test_unusable_inputs_only_data_is_one_line(user: str, form: str, words: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(f"{user}:{form}")
    assert words in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- compress


@pytest.mark.parametrize("form", ["arrays", "dicts"])
def test_compress_from_inputs_only_distils_and_shows_agreement(user: str, form: str,
                                                               capsys) -> None:
    code, out, err = compress(capsys, user, form)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("stage "))
    assert "top-1 agreement with teacher" in header and "accuracy" not in header
    assert "distil from the uncompressed input model (the data has no labels)" in out
    model = api.load(Path("small.nnc"))
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) > 0


def test_compress_metric_and_teacher_on_labelled_data(user: str, capsys) -> None:
    code, out, err = compress(capsys, user, "labelled", "--metric", "kl", "--teacher",
                              "original")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("stage "))
    assert "KL to teacher (nats)" in header
    assert "distil from the uncompressed input model: kd loss, T=4, alpha=0.9" in out
    code, out, err = compress(capsys, user, "labelled", "--teacher", "none")
    assert code == 0, err
    assert "accuracy" in out and "no teacher" in out


@pytest.mark.parametrize(("data", "extra", "words"), [
    ("arrays", ("--metric", "bogus"), "--metric must be one of accuracy, agreement"),
    ("arrays", ("--teacher", "student"), "--teacher must be original"),
    ("arrays", ("--teacher", "none"), "needs labels"),
    ("arrays", ("--metric", "accuracy"), "needs labelled data"),
    ("arrays", ("--max-drop", "1", "--metric", "kl"),
     "max_drop 1 on inputs only is a budget in points of the quality metric, which must be "
     "one where higher is better (agreement, cosine, r2); got metric 'kl'"),
])
def test_compress_refusals_are_one_line(user: str, capsys, data: str,
                                        extra: tuple[str, ...], words: str) -> None:
    code, _, err = compress(capsys, user, data, *extra)
    assert words in error_line(code, err)
    assert not Path("small.nnc").exists()


def test_compress_max_drop_on_inputs_only_budgets_the_agreement(user: str, capsys) -> None:
    code, out, err = compress(capsys, user, "arrays", "--max-drop", "2")
    assert code == 0, err
    assert "max_drop 2 pt of top-1 agreement with teacher (the data has no labels)" in out
    assert "max_drop: stage 1 magnitude_prune (sparsity 0.5): validation agreement" in out
    assert Path("small.nnc").exists()


@pytest.mark.parametrize("argv", [
    ("compress", "--model", "mlp", "--recipe", "r.yaml", "--out", "m.nnc"),
    ("train", "--model", "mlp", "--out", "m.nnc"),
    ("cascade", "--models", "mlp,cnn1d", "--budget-macs", "50%", "--out", "m.nnc"),
    ("router", "--models", "mlp,cnn1d", "--budget-macs", "50%", "--out", "m.nnc"),
    ("zip", "--model-a", "mlp", "--model-b", "mlp", "--data-b", "mnist1d", "--out", "m.nnc"),
    ("branches", "--backbone", "mlp", "--out", "m.nnc"),
])
def test_commands_that_train_on_labels_refuse_inputs_only_data(user: str, capsys,
                                                               argv: tuple[str, ...]) -> None:
    option = {"zip": "--data-a", "branches": "--data"}.get(argv[0], "--data")
    code, _, err = run_cli(capsys, *argv, option, f"{user}:arrays")
    line = error_line(code, err)
    assert "needs labels" in line and "gives inputs only" in line
    assert not Path("m.nnc").exists()


# --------------------------------------------------------------------------- eval


def test_eval_on_inputs_only_compares_with_a_teacher(user: str, capsys) -> None:
    assert compress(capsys, user, "arrays")[0] == 0
    code, _, err = run_cli(capsys, "eval", "small.nnc", "--data", f"{user}:arrays",
                           "--no-latency")
    assert "give --teacher MODEL" in error_line(code, err)
    code, out, err = run_cli(capsys, "eval", "small.nnc", "--data", f"{user}:arrays",
                             "--no-latency", "--teacher", f"{user}:build", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert figures["metric"] == "agreement" and "accuracy" not in figures
    assert 0.0 <= figures["quality"] <= 1.0
    code, out, err = run_cli(capsys, "eval", "small.nnc", "--data", f"{user}:arrays",
                             "--no-latency", "--teacher", f"{user}:build", "--metric",
                             "cosine")
    assert code == 0, err
    assert "test cosine to teacher" in out
    code, _, err = run_cli(capsys, "eval", "small.nnc", "--data", f"{user}:labelled",
                           "--no-latency", "--teacher", f"{user}:build")
    assert "--teacher is for metrics that compare" in error_line(code, err)


# --------------------------------------------------------------------------- help


def test_help_documents_label_free_compression(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--teacher original|none", "--metric NAME", "inputs only",
                  "(x_train, x_test) arrays", "distils from the uncompressed input model"):
        assert words in out


def test_the_metrics_in_the_help_are_the_registered_ones() -> None:
    assert sorted(METRICS_HELP) == sorted(METRICS.names())
