"""Hostile recipes (issue #8): every limit of the YAML reader gives a one-line RecipeError
naming the limit and where, before memory or time run out; files that are not regular
files are refused before anything is read."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from nncompress._yaml import DEFAULT_LIMITS, YAMLLimits, load_bounded
from nncompress.errors import RecipeError
from nncompress.recipe import Recipe

STAGE = "name: x\nstages: [{fine_tune: {epochs: %s}}]\n"


def laughs(levels: int, width: int = 10) -> str:
    """Billion laughs: each level is a list of ``width`` aliases of the level below."""
    lines = ["a0: &a0 [lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]"
              for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nname: x\nstages: *a{levels}\n"


def one_line_error(text: str, seconds: float = 2.0) -> str:
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text)
    assert time.perf_counter() - start < seconds
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("text", "expected"), [
    (laughs(9), "more than 10000 YAML nodes (aliases counted as copies) at line 5, column 25"),
    (laughs(5), "more than 10000 YAML nodes"),
    ("name: x\nstages: " + "[" * 10_000 + "]" * 10_000,
     "YAML nesting deeper than 64 levels at line 2, column 72"),
    ("name: x\nstages:\n" + "".join("  " * i + "-\n" for i in range(1, 300)),
     "YAML nesting deeper than 64 levels at line 66"),
    (STAGE % ("9" * 5000), "integer literal of 5000 digits (the limit is 100) at line 2, "
                           "column 31"),
    (STAGE % ("0x" + "f" * 5000), "integer literal of 5002 digits"),
    (STAGE % ":".join(["59"] * 2000), "integer literal of 5999 digits"),
    ("name: x\nstages: [{evaluate: {}}]\n# " + "x" * (50 << 20) + "\n",
     "YAML text larger than the limit of 1 MiB"),
    ("name: x\nstages: &s [*s]\n", "recursive YAML alias *s at line 2, column 13"),
    ("name: x\nstages: [" + ", ".join(f"&x{i} 1" for i in range(101)) + "]",
     "more than 100 YAML anchors at line 2"),
    ("a: &a 1\nname: x\nstages: [" + ", ".join(["*a"] * 101) + "]",
     "more than 100 YAML aliases at line 3"),
    ("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: &b " + "[" * 40 + "*a" + "]" * 40 +
     "\nname: x\nstages: [*b]\n", "YAML nesting deeper than 64 levels (aliases counted"),
    (STAGE % "!!int abc", "invalid YAML at line 2, column 31: cannot read 'abc' as int"),
    (STAGE % "!!int ''", "cannot read '' as int"),
    (STAGE % "!!bool maybe", "cannot read 'maybe' as bool"),
    (STAGE % "!!timestamp never", "cannot read 'never' as timestamp"),
    ("name: \udcff\nstages: []\n", "invalid YAML at line 1, column 7: character U+DCFF"),
    ("name: a\nstages: [{evaluate: {}}]\n---\nname: b\n",
     "at line 3, column 1: expected a single document in the stream, but found another"),
])
def test_hostile_yaml_gives_a_one_line_error_naming_the_limit(text: str, expected: str) -> None:
    assert expected in one_line_error(text)


def test_the_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))
    assert one_line_error(str(path)).startswith(f"{path}: more than 10000 YAML nodes")


def test_limits_leave_legitimate_yaml_alone() -> None:
    """Up to each limit is fine: 64 levels, 10,000 nodes, 100 aliases and anchors,
    100-digit integers, 1 MiB of text (anchors and merge keys in a recipe still work)."""
    assert load_bounded("[" * 64 + "]" * 64) is not None
    assert len(load_bounded("[" + ", ".join(["1"] * 9_999) + "]")) == 9_999
    assert load_bounded("a: &a 1\nb: [" + ", ".join(["*a"] * 99) + "]")["b"] == [1] * 99
    assert load_bounded("9" * 100) == int("9" * 100)
    assert load_bounded("# " + "x" * ((1 << 20) - 3) + "\n") is None
    recipe = Recipe.from_yaml("name: x\nstages:\n  - fine_tune: &ft {epochs: 1, lr: 0.01}\n"
                              "  - fine_tune: {<<: *ft, epochs: 2}\n")
    assert [s.params["epochs"] for s in recipe.stages] == [1, 2]
    assert recipe.stages[1].params["lr"] == 0.01


def test_limits_are_configurable() -> None:
    tight = YAMLLimits(max_depth=3, max_nodes=5, max_aliases=1, max_int_digits=2)
    assert load_bounded("[[1]]", tight) == [[1]]
    for text, needle in (("[[[[1]]]]", "deeper than 3"), ("[1, 2, 3, 4, 5]", "more than 5"),
                         ("a: &a 1\nb: [*a, *a]", "more than 1 YAML aliases"),
                         ("123", "integer literal of 3 digits")):
        with pytest.raises(Exception, match=needle):
            load_bounded(text, tight)
    assert DEFAULT_LIMITS.max_bytes == 1 << 20


@pytest.mark.parametrize("name", Recipe.names())
def test_every_packaged_recipe_still_loads(name: str) -> None:
    assert Recipe.named(name).stages


# --------------------------------------------------------------------------- files


def test_recipe_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    message = one_line_error(str(fifo))
    assert message == f"recipe file {str(fifo)!r} is a FIFO (named pipe), not a regular file"
    with pytest.raises(RecipeError, match="is a FIFO"):
        Recipe.resolve(str(fifo))
    plain = tmp_path / "pipe"            # no .yaml suffix: still read as a path
    os.mkfifo(plain)
    with pytest.raises(RecipeError, match="is a FIFO"):
        Recipe.resolve(str(plain))


def test_recipe_device_folder_and_socket_are_refused(tmp_path: Path) -> None:
    assert "is a character device" in one_line_error("/dev/zero")
    assert "is a folder" in one_line_error(str(tmp_path))
    sock_path = tmp_path / "s.yaml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "is a socket" in one_line_error(str(sock_path))


def test_large_recipe_file_is_refused_before_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as handle:   # sparse: 50 MB apparent size, nothing written
        handle.truncate(50 << 20)
    assert one_line_error(str(path), seconds=0.5) == (
        f"recipe file {str(path)!r} is larger than the limit of 1 MiB")


def test_undecodable_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\nstages: [{evaluate: {}}]\n")
    assert "is not UTF-8 text (byte 9)" in one_line_error(str(path))
