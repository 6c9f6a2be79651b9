"""Fuzzing the recipe reader: seeded mutations of the packaged recipes plus hostile YAML.

Every case must end in a :class:`~nncompress.recipe.Recipe` or a one-line
:class:`~nncompress.errors.RecipeError`, within a time bound. The hostile cases are the
findings of issue #8 (billion-laughs aliases, 10,000-deep nesting, a 5,000-digit integer,
a 50 MB recipe) and their relatives; the mutations delete, duplicate, swap and insert
YAML syntax (anchors, aliases, tags, flow brackets, indentation, extreme numbers,
control characters) into the packaged recipes, 1-4 edits per case.

Usage: ``python bench/fuzz_recipes.py [--cases 10000] [--seed 0]``; ``bench_fuzz_recipes``
and ``fuzz_recipes_markdown`` are shown beside the ``.nnc`` fuzzer (``bench/fuzz.py``).
The test suite runs a few hundred of these cases (``tests/test_recipe_fuzz.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from nncompress._yaml import DEFAULT_LIMITS
from nncompress.errors import RecipeError
from nncompress.recipe import Recipe

#: seconds one case may take (the reader's worst legitimate case, 1 MiB, takes ~1.3 s)
TIME_BOUND = 5.0
OUTCOMES = ("valid", "recipe_error", "other_exception", "over_time")

_TOKENS = ("[", "]", "{", "}", ": ", ", ", "- ", "? ", "&a ", "&b ", "*a", "*b", "<<: *a",
           "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!str ",
           "!!python/object/apply:os.system ['true'] ", "!custom ", "'", '"', "# ", "\n",
           "  ", "\t", "|\n", ">-\n", "%YAML 1.1\n", "---\n", "...\n", "0x", "0b", "0o",
           "9" * 120, "1e999", "-1e-999", ".nan", ".inf", "~", "null", "true", "-1", "0",
           "1_000", "1:30:00", "2001-12-14t21:59:43.10-05:00", "\x1b[31m", "\u202e",
           "\x00", "\ufeff", "\x85", "\\x", "\\u", "é", "😀", "=")
_NUMBERS = ("-1", "0", "1", "0.5", "1e308", "-1e308", "10" * 30, ".nan", "-.inf", "1.5",
            "2", "1000000", "0x7fffffff", "true", "null", "''", "[]", "{}")


def _hostile() -> list[tuple[str, str]]:
    """(label, text) for every hostile case; the largest is issue #8's 50 MB recipe."""
    laughs = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                  for i in range(1, 10)]
    stage = "name: x\nstages: [{fine_tune: {epochs: %s}}]\n"
    huge = DEFAULT_LIMITS.max_bytes
    return [
        ("billion laughs", "\n".join(laughs) + "\nname: x\nstages: *a9\n"),
        ("10,000-deep flow nesting", "name: x\nstages: " + "[" * 10_000 + "]" * 10_000),
        ("300-deep block nesting", "name: x\nstages:\n" + "".join(
            "  " * i + "-\n" for i in range(1, 300))),
        ("5,000-digit integer", stage % ("9" * 5000)),
        ("5,000-digit hex integer", stage % ("0x" + "f" * 5000)),
        ("sexagesimal integer", stage % ":".join(["59"] * 2000)),
        ("50 MB recipe", "name: x\nstages: [{evaluate: {}}]\n# " + "x" * (50 << 20) + "\n"),
        ("1 MiB + 1 byte", "name: x\nstages: [{evaluate: {}}]\n#" + "x" * huge + "\n"),
        ("recursive alias", "name: x\nstages: &s [*s]\n"),
        ("alias chain deeper than the limit", "a: &a " + "[" * 40 + "1" + "]" * 40 +
         "\nb: &b " + "[" * 40 + "*a" + "]" * 40 + "\nname: x\nstages: [*b]\n"),
        ("200 anchors", "name: x\nstages: [" + ", ".join(f"&x{i} 1" for i in range(200)) + "]"),
        ("200 aliases", "a: &a 1\nname: x\nstages: [" + ", ".join(["*a"] * 200) + "]"),
        ("20,000 nodes", "name: x\nstages: [" + ", ".join(["1"] * 20_000) + "]"),
        ("python tag", "name: !!python/object/apply:os.system ['true']\nstages: []\n"),
        ("bad explicit int", stage % "!!int abc"), ("empty explicit int", stage % "!!int ''"),
        ("bad explicit bool", stage % "!!bool maybe"),
        ("bad timestamp", stage % "!!timestamp never"),
        ("bad binary", stage % "!!binary '%%%'"),
        ("lone surrogate", "name: \udcff\nstages: [{evaluate: {}}]\n"),
        ("NUL byte", "name: a\x00b\nstages: [{evaluate: {}}]\n"),
        ("ANSI escape in a name", "name: \"\\e[31mred\"\nstages: [{evaluate: {}}]\n"),
        ("two documents", "name: a\nstages: [{evaluate: {}}]\n---\nname: b\n"),
        ("unhashable key", "? [a]\n: b\nname: x\nstages: [{evaluate: {}}]\n"),
        ("merge of a scalar", "name: x\nstages: [{fine_tune: {<<: 3}}]\n"),
    ]


def _packaged() -> list[str]:
    folder = importlib.resources.files("nncompress").joinpath("recipes")
    return [folder.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
            for name in Recipe.names()]


def _mutate_once(text: str, rng: random.Random) -> str:
    """One random edit: delete, duplicate, insert a token, replace a number, swap or
    re-indent a line, or truncate."""
    op = rng.randrange(7)
    i = rng.randrange(len(text) + 1)
    j = min(len(text), i + rng.randint(1, 24))
    if op == 0:
        return text[:i] + text[j:]
    if op == 1:
        return text[:j] + text[i:j] * rng.randint(1, 3) + text[j:]
    if op == 2:
        return text[:i] + rng.choice(_TOKENS) + text[i:]
    if op == 3:
        digits = [k for k, c in enumerate(text) if c.isdigit()]
        if digits:
            k = rng.choice(digits)
            return text[:k] + rng.choice(_NUMBERS) + text[k + 1:]
        return text
    lines = text.split("\n")
    a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
    if op == 4:
        lines[a], lines[b] = lines[b], lines[a]
    elif op == 5:
        lines[a] = " " * rng.choice((0, 1, 2, 3, 4, 6, 8)) + lines[a].lstrip(" ")
    else:
        return text[:i]
    return "\n".join(lines)


def mutations(cases: int, seed: int = 0) -> Iterator[str]:
    """``cases`` seeded mutations (1-4 edits each) of the packaged recipes."""
    rng = random.Random(seed)
    sources = _packaged()
    for _ in range(cases):
        text = rng.choice(sources)
        for _ in range(rng.randint(1, 4)):
            text = _mutate_once(text, rng)
        yield text


def hostile_cases() -> list[tuple[str, str]]:
    """The hostile (label, text) cases, issue #8's findings first."""
    return _hostile()


class _CaseTimeout(BaseException):
    """Raised by the alarm when one case runs past its bound (never caught by user code)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (main thread on POSIX); elsewhere a no-op."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise _CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def classify(text: str, bound: float = TIME_BOUND) -> tuple[str, float, str]:
    """(outcome, seconds, detail) of reading one case with ``Recipe.from_yaml``.

    The outcome is one of :data:`OUTCOMES`; a RecipeError whose message spans several
    lines counts as ``other_exception``. A case still running at twice the bound is
    interrupted (and counted ``over_time``).
    """
    start = time.perf_counter()
    try:
        with _deadline(2 * bound):
            Recipe.from_yaml(text)
        outcome, detail = "valid", ""
    except _CaseTimeout:
        outcome, detail = "over_time", "interrupted"
    except RecipeError as exc:
        one_line = "\n" not in str(exc) and "\r" not in str(exc)
        outcome = "recipe_error" if one_line else "other_exception"
        detail = str(exc)
    except Exception as exc:
        outcome, detail = "other_exception", f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if seconds > bound:
        outcome = "over_time"
    return outcome, seconds, detail


def bench_fuzz_recipes(echo: Callable[[str], None], cases: int = 10_000,
                       seed: int = 0) -> dict[str, Any]:
    """Read ``cases`` seeded mutations and every hostile case; count the outcomes.

    Returns ``{"cases", "seed", "time_bound_s", "counts": {outcome: n}, "max_seconds",
    "slowest", "hostile": [(label, outcome, seconds, detail)], "failures": [...]}``;
    ``failures`` lists up to 20 cases that were neither valid nor a one-line RecipeError.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    failures: list[dict[str, Any]] = []
    slowest = (0.0, "")
    hostile: list[tuple[str, str, float, str]] = []
    labelled = [(label, text) for label, text in hostile_cases()]
    labelled += [(f"mutation {k}", text) for k, text in enumerate(mutations(cases, seed))]
    echo(f"fuzzing the recipe reader: {len(labelled)} cases (seed {seed})")
    for k, (label, text) in enumerate(labelled):
        outcome, seconds, detail = classify(text)
        counts[outcome] += 1
        if seconds > slowest[0]:
            slowest = (seconds, label)
        if not label.startswith("mutation "):
            hostile.append((label, outcome, seconds, detail))
        if outcome in ("other_exception", "over_time") and len(failures) < 20:
            failures.append({"case": label, "outcome": outcome, "seconds": seconds,
                             "detail": detail[:200], "text": text[:200]})
        if k and k % 2000 == 0:
            echo(f"  {k} cases read")
    return {"cases": len(labelled), "seed": seed, "time_bound_s": TIME_BOUND,
            "counts": counts, "max_seconds": slowest[0], "slowest": slowest[1],
            "hostile": hostile, "failures": failures}


def fuzz_recipes_markdown(result: dict[str, Any]) -> str:
    """The outcome counts, the hostile cases one per row, and any failures."""
    lim = DEFAULT_LIMITS
    total = max(1, result["cases"])
    lines = [
        f"Recipe reader (`Recipe.from_yaml`), {result['cases']} cases: every hostile case "
        f"below plus seeded mutations of the packaged recipes (seed {result['seed']}). "
        f"Limits: {lim.max_bytes >> 20} MiB of text, nesting {lim.max_depth}, "
        f"{lim.max_nodes} nodes, {lim.max_aliases} aliases, {lim.max_anchors} anchors, "
        f"{lim.max_int_digits}-digit integers. Time bound {result['time_bound_s']:.0f} s "
        f"per case; slowest case {result['max_seconds']:.2f} s ({result['slowest']}).", "",
        "| outcome | cases | share |", "|---|---:|---:|"]
    names = {"valid": "valid recipe", "recipe_error": "one-line RecipeError",
             "other_exception": "other exception", "over_time": "over the time bound"}
    lines += [f"| {names[k]} | {n} | {100 * n / total:.1f} % |"
              for k, n in result["counts"].items()]
    lines += ["", "| hostile case | outcome | seconds | message |", "|---|---|---:|---|"]
    lines += [f"| {label} | {outcome} | {sec:.3f} | {_cell(detail)} |"
              for label, outcome, sec, detail in result["hostile"]]
    if result["failures"]:
        lines += ["", "Failures (neither a recipe nor a one-line RecipeError):", ""]
        lines += [f"- {f['case']}: {f['outcome']}, {_cell(f['detail'])}"
                  for f in result["failures"]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Markdown-table-safe, printable, at most 110 characters."""
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text).replace("|", "\\|")
    return safe if len(safe) <= 110 else safe[:107] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(fuzz_recipes_markdown(bench_fuzz_recipes(print, args.cases, args.seed)))


if __name__ == "__main__":
    main()
