"""Issue #8, B(5): the demo's report folder is written atomically. It is built in a hidden
folder beside its target and renamed into place at the end; an error or Ctrl-C half-way
leaves no partial folder, and an earlier report is replaced only when the new one is
complete. Ctrl-C still exits with status 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nncompress import cli
from nncompress.demo import run_demo
from nncompress.report.writer import REPORT_MARKER, OutputError, staged_folder


def old_report(folder: Path) -> Path:
    """An earlier report folder: the marker and one file to recognise it by."""
    folder.mkdir()
    (folder / REPORT_MARKER).write_text("nncompress demo\n")
    (folder / "report.md").write_text("# the old report\n")
    return folder


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_staged_folder_replaces_an_earlier_report_only_at_the_end(tmp_path: Path) -> None:
    target = old_report(tmp_path / "report")
    with staged_folder(target) as stage:
        (stage / "report.md").write_text("# new\n")
        assert (target / "report.md").read_text() == "# the old report\n"
        assert stage.parent == tmp_path and stage.name.startswith(".report.")
    assert (target / "report.md").read_text() == "# new\n"
    assert not (target / REPORT_MARKER).exists()     # the folder was replaced as a whole
    assert leftovers(tmp_path, "report") == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_folder_leaves_nothing_on_error(tmp_path: Path, error: BaseException) -> None:
    target = old_report(tmp_path / "report")
    with pytest.raises(type(error)), staged_folder(target) as stage:
        (stage / "half.md").write_text("half")
        raise error
    assert sorted(p.name for p in target.iterdir()) == [REPORT_MARKER, "report.md"]
    assert (target / "report.md").read_text() == "# the old report\n"
    assert leftovers(tmp_path, "report") == []
    with pytest.raises(KeyboardInterrupt), staged_folder(tmp_path / "fresh"):
        raise KeyboardInterrupt
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path, "fresh") == []


def test_staged_folder_refuses_a_folder_that_is_not_a_report(tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputError, match="holds files that are not an nncompress report"), \
            staged_folder(other):
        pass
    assert (other / "cat.jpg").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_folder(empty) as stage:
        (stage / "x").write_text("1")
    assert (empty / "x").exists()


def test_run_demo_interrupted_keeps_the_old_report(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCOMPRESS_CACHE", str(tmp_path / "cache"))
    target = old_report(tmp_path / "report")

    def echo(message: str) -> None:     # Ctrl-C once the staging folder holds files
        if "training or loading" in message:
            assert leftovers(tmp_path, "report"), "the report is built beside its target"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(target, models=["mlp"], recipes=("magnitude-prune",), quick=True,
                 progress=False, echo=echo)
    assert (target / "report.md").read_text() == "# the old report\n"
    assert leftovers(tmp_path, "report") == []


def test_cli_demo_interrupted_exits_130_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import nncompress.demo as demo

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run_models", interrupted)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--models", "mlp", "--out", "report", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "nncompress: interrupted"
    assert sorted(os.listdir(tmp_path)) == []


def test_sigint_to_a_real_demo_process(tmp_path: Path) -> None:
    """What a user's Ctrl-C does: SIGINT while the report is being built."""
    env = {**os.environ, "NNCOMPRESS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nncompress", "demo", "--quick",
                             "--models", "mlp", "--out", "report", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp_path, "report") and proc.poll() is None:
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "nncompress: interrupted"
    assert not (tmp_path / "report").exists() and leftovers(tmp_path, "report") == []
