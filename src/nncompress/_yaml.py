"""Bounded, safe YAML for untrusted configs (recipes), and bounded reading of text files.

``yaml.safe_load`` never runs code, but it is not bounded: a few hundred bytes of nested
aliases ("billion laughs") expand to gigabytes in anything that walks the result, deep
nesting ends in ``RecursionError``, a 5,000-digit integer in ``ValueError`` (Python's
int-parsing limit), a wrong explicit tag (``!!int abc``) in ``ValueError`` or
``KeyError``, and a 50 MB file simply takes minutes. :func:`load_bounded` parses with a
:class:`yaml.SafeLoader` subclass (never an unsafe loader) that enforces
:class:`YAMLLimits` while composing, so it stops at the first node past a limit, and
turns every failure into a :class:`yaml.MarkedYAMLError` that knows its line and column.

:func:`read_text_file` reads a file that a user named: regular files only (a FIFO would
block, ``/dev/zero`` never ends), at most ``limit`` bytes, without a race between the
check and the read.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.events import AliasEvent

__all__ = ["DEFAULT_LIMITS", "YAMLLimitError", "YAMLLimits", "describe_error", "file_kind",
           "load_bounded", "read_text_file"]


@dataclass(frozen=True)
class YAMLLimits:
    """What one YAML document may hold.

    ``max_bytes``: UTF-8 size of the text, checked before parsing. ``max_depth``: nesting
    of collections, counted through aliases (an alias of a 10-deep list 50 levels down
    is 60 deep). ``max_nodes``: scalars and collections, every alias counted as a full
    copy of what it names (what a consumer that walks the result sees).
    ``max_aliases`` / ``max_anchors``: uses of ``*name`` / definitions of ``&name``.
    ``max_int_digits``: characters of an integer literal, underscores and sign excluded.
    """

    max_bytes: int = 1 << 20
    max_depth: int = 64
    max_nodes: int = 10_000
    max_aliases: int = 100
    max_anchors: int = 100
    max_int_digits: int = 100


DEFAULT_LIMITS = YAMLLimits()


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document broke one of the :class:`YAMLLimits` (``problem`` names the limit)."""


def _fmt_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts nodes, aliases, anchors and depth while composing.

    Sizes and heights of anchored nodes are remembered so each alias is charged for the
    whole subtree it stands for; an alias of a node still being composed (a recursive
    structure) is refused.
    """

    def __init__(self, text: str, limits: YAMLLimits) -> None:
        super().__init__(text)
        self.limits = limits
        self._frames: list[list[int]] = []      # per open collection: [subtree size, height]
        self._anchored: dict[str, tuple[int, int]] = {}   # anchor -> (size, height)
        self._nodes = 0
        self._aliases = 0

    def _fail(self, problem: str, mark: Any) -> NoReturn:
        raise YAMLLimitError(None, None, problem, mark)

    def _charge(self, size: int, height: int, mark: Any, *, new: int) -> None:
        """Add a finished node of ``size`` nodes and ``height`` levels to its parent;
        ``new`` of those are not counted yet (1 for a node, all of them for an alias)."""
        self._nodes += new
        if self._nodes > self.limits.max_nodes:
            self._fail(f"more than {self.limits.max_nodes} YAML nodes (aliases counted as "
                       "copies)", mark)
        if len(self._frames) + height > self.limits.max_depth:
            self._fail(f"YAML nesting deeper than {self.limits.max_depth} levels "
                       "(aliases counted as copies)", mark)
        if self._frames:
            frame = self._frames[-1]
            frame[0] += size
            frame[1] = max(frame[1], height)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._aliases += 1
            if self._aliases > self.limits.max_aliases:
                self._fail(f"more than {self.limits.max_aliases} YAML aliases",
                           event.start_mark)
            if event.anchor in self.anchors and event.anchor not in self._anchored:
                self._fail(f"recursive YAML alias *{event.anchor}", event.start_mark)
            node = super().compose_node(parent, index)   # undefined alias: ComposerError
            size, height = self._anchored[event.anchor]
            self._charge(size, height, event.start_mark, new=size)
            return node
        if event.anchor is not None and len(self.anchors) >= self.limits.max_anchors:
            self._fail(f"more than {self.limits.max_anchors} YAML anchors", event.start_mark)
        self._frames.append([0, 0])
        if len(self._frames) > self.limits.max_depth:
            self._fail(f"YAML nesting deeper than {self.limits.max_depth} levels",
                       event.start_mark)
        node = super().compose_node(parent, index)
        size, height = self._frames.pop()
        if event.anchor is not None:
            self._anchored[event.anchor] = (size + 1, height + 1)
        self._charge(size + 1, height + 1, event.start_mark, new=1)
        return node

    def construct_yaml_int(self, node: Any) -> int:
        digits = len(str(node.value).replace("_", "").lstrip("+-"))
        if digits > self.limits.max_int_digits:
            self._fail(f"integer literal of {digits} digits (the limit is "
                       f"{self.limits.max_int_digits})", node.start_mark)
        return super().construct_yaml_int(node)


def _checked(constructor: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A scalar constructor whose Python errors (``!!int abc``: ValueError, ``!!bool x``:
    KeyError, ``!!timestamp x``: AttributeError) become a marked YAML error."""

    @functools.wraps(constructor)
    def construct(loader: Any, node: Any) -> Any:
        try:
            return constructor(loader, node)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as exc:
            tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_short(node.value)} as {tag} "
                f"({type(exc).__name__})", node.start_mark) from None
    return construct


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


for _tag in ("null", "bool", "float", "binary", "timestamp"):
    _full = f"tag:yaml.org,2002:{_tag}"
    _BoundedLoader.add_constructor(_full, _checked(_BoundedLoader.yaml_constructors[_full]))
_BoundedLoader.add_constructor("tag:yaml.org,2002:int",
                               _checked(_BoundedLoader.construct_yaml_int))


def load_bounded(text: str, limits: YAMLLimits = DEFAULT_LIMITS) -> Any:
    """Parse one YAML document with a safe loader within ``limits``.

    Raises :class:`YAMLLimitError` (a ``MarkedYAMLError``; ``problem`` names the limit,
    ``problem_mark`` the position when known) or any other ``yaml.YAMLError``.
    """
    if (len(text) > limits.max_bytes
            or len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes):
        raise YAMLLimitError(None, None, "YAML text larger than the limit of "
                             f"{_fmt_bytes(limits.max_bytes)}", None)
    loader = _BoundedLoader(text, limits)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe_error(exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: ``invalid YAML at line L, column C: problem``, or for a
    broken limit ``<limit> at line L, column C`` (the position wherever it is known)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["error"])[0]
    pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    context = getattr(exc, "context", None)
    if context and problem:
        problem = f"{context}, {problem}" if problem.startswith("but ") else \
            f"{context}: {problem}"
    if isinstance(exc, yaml.reader.ReaderError):  # knows only a character offset
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        pos = f" at line {line}, column {column}"
        problem = f"character U+{code:04X}: {exc.reason}"
    if isinstance(exc, YAMLLimitError):
        return f"{problem}{pos}"
    return f"invalid YAML{pos}: {problem}"


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))


def file_kind(mode: int) -> str:
    """What an ``st_mode`` describes, for messages: "a folder", "a FIFO (named pipe)", ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_text_file(path: Path, limit: int, error: type[Exception], what: str) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``limit`` bytes.

    Anything else raises ``error`` with one line naming ``what`` and the path: a missing
    file, a folder, FIFO, device or socket (refused before anything is read; the file is
    opened non-blocking and checked on the open descriptor), a larger file, bad UTF-8.
    """
    name = f"{what} {str(path)!r}"
    try:
        mode = os.stat(path).st_mode        # a socket cannot even be opened: say what it is
        if not stat.S_ISREG(mode):
            raise error(f"{name} is {file_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{name} is {file_kind(mode)}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{name} is larger than the limit of {_fmt_bytes(limit)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name} is not UTF-8 text (byte {exc.start})") from None
