"""The ``nncompress`` command line: a thin layer over :mod:`nncompress.api`.

Bad input gives one line on stderr (``nncompress: error: ...``) and exit status 2; Ctrl-C
gives ``nncompress: interrupted`` and 130; a bug gives one ``internal error`` line and 1
(``--debug`` shows its traceback). The parser is in :mod:`nncompress.cli_parser` (help
texts in :mod:`nncompress.cli_help`), the subcommands in :mod:`nncompress.cli_commands`
(``eval`` in :mod:`nncompress.cli_eval`, those over several models in
:mod:`nncompress.cli_multi`), input and output checks in :mod:`nncompress.cli_inputs`.

Label-free compression: ``--data module:function`` may return inputs only (see
:mod:`nncompress.data.user`); ``compress --teacher original|none`` says what its training
stages learn from and ``--metric NAME`` what every table measures (``eval --metric`` with
``--teacher MODEL`` likewise).

The current folder is never searched for our own imports: ``main`` takes it off
``sys.path`` (``python -m`` puts it first) before torch, numpy, yaml or pydantic are
imported, so a ``numpy.py`` in the folder where a user runs ``nncompress inspect`` is
never executed. It joins ``sys.path`` (appended) only while a ``module:function`` that
the user named (``--data``, ``--model``, ``--model-class``) is imported and called.
This module imports nothing at its top that ``python -m`` has not already imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nncompress`` and ``python -m nncompress``; returns the exit code.

    ``sys.path`` is restored on return (for callers in the same process)."""
    saved = list(sys.path)
    sys.path[:] = _without_cwd(sys.path)
    try:
        return _run(argv)
    finally:
        sys.path[:] = saved


def _without_cwd(path: Sequence[str]) -> list[str]:
    """``path`` less every entry that names the current folder ('' included)."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was deleted: only '' can name it
        return [p for p in path if p]
    return [p for p in path if p and os.path.realpath(p) != cwd]


def _run(argv: Sequence[str] | None) -> int:
    from nncompress.errors import NNCError

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        from nncompress.cli_commands import HANDLERS
        from nncompress.cli_eval import HANDLERS as EVAL_HANDLERS
        from nncompress.cli_multi import HANDLERS as MULTI_HANDLERS
        from nncompress.cli_parser import build_parser

        args = build_parser().parse_args(argv)
        return {**HANDLERS, **EVAL_HANDLERS, **MULTI_HANDLERS}[args.handler](args)
    except NNCError as exc:
        _say(f"nncompress: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("nncompress: interrupted")
        _forget_interrupt()
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`nncompress inspect x.nnc | head`)
        _silence_stdout()
        return EXIT_INTERNAL
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        _say(f"nncompress: internal error: {msg} (rerun with --debug for a traceback)")
        return EXIT_INTERNAL


def _forget_interrupt() -> None:
    """Make the exit status the 130 we return, under ``python -m`` too.

    CPython notes a KeyboardInterrupt that escapes code run from a string (``exec`` of
    the methods ``dataclass`` and ``namedtuple`` generate, often mid-import at Ctrl-C)
    and, under ``python -m``, then ends the process by re-raising SIGINT even though the
    exception was handled. Running any string resets that note.
    """
    exec("pass", {})


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass   # no real file descriptor (captured output): nothing to flush


def _say(line: str) -> None:
    """One line on stderr, every non-printable character escaped."""
    from nncompress.cli_inputs import printable

    print(printable(line), file=sys.stderr)


def build_parser() -> Any:
    """The argument parser (see :mod:`nncompress.cli_parser`)."""
    from nncompress.cli_parser import build_parser as build

    return build()
