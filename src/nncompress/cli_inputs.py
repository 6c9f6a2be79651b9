"""What the command line reads and writes, checked before any work starts.

- :func:`printable`: every name that came from a file or from user code is escaped
  before it reaches a terminal (ANSI escapes, bidi controls, lone surrogates).
- :func:`check_input_file` / :func:`check_output_file`: regular files only (a FIFO would
  block, ``/dev/zero`` never ends), existing output folders, no folder where a file goes.
- :func:`user_import_path`: the current folder joins ``sys.path`` (appended, so an
  installed package always wins) only while a ``module:function`` the user named is
  imported and called; :mod:`nncompress.cli` keeps it off the path otherwise.
- :func:`load_model` / :func:`load_data`: ``--model`` (a reference model's name, a
  ``.nnc`` file, or ``module:function``), ``--model-class module:Class`` for a ``.nnc`` of
  a user model, and ``--data``.
- :func:`refuse_pickled`: a model file in a pickle-based format (``.pt2``, ``.pt``,
  ``.pth``, ...) is refused by its name, before anything opens it (design principle 7).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect as pyinspect
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nncompress._yaml import file_kind
from nncompress.errors import DataError, FormatError, ModelError, NNCError

if TYPE_CHECKING:
    from torch import nn

    from nncompress.data import Dataset

__all__ = ["PICKLED_SUFFIXES", "CLIError", "check_input_file", "check_output_file",
           "import_reference", "is_reference", "load_data", "load_model", "printable",
           "refuse_pickled", "user_import_path"]

#: model file suffixes whose loaders unpickle (run code from) the file: suffix -> why
PICKLED_SUFFIXES: dict[str, str] = {
    ".pt2": "torch.export.load unpickles data from them, through "
            "torch.load(weights_only=False) for weights saved with use_pickle",
    ".pt": "torch.load unpickles them", ".pth": "torch.load unpickles them",
    ".ckpt": "checkpoints are pickles", ".pkl": "they are pickles",
    ".pickle": "they are pickles",
}


class CLIError(NNCError):
    """A command-line value is invalid: a bad option value, an output path that cannot be
    written, an option that does not fit the others."""


# --------------------------------------------------------------------------- text


def printable(text: object, *, newlines: bool = False) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``,
    ``\\udcff``), so a name from a file cannot drive the terminal; ``newlines=True`` keeps
    line breaks (for whole tables)."""
    out = []
    for ch in str(text):
        if ch.isprintable() or (newlines and ch == "\n"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def quoted(path: object) -> str:
    """A path or value for a message: repr-quoted and escaped."""
    return printable(repr(str(path)))


# --------------------------------------------------------------------------- paths


def check_input_file(path: Path, what: str, error: type[NNCError] = FormatError) -> Path:
    """``path`` must name an existing regular file (symlinks followed); FIFOs, devices,
    sockets and folders are refused before anything opens them."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {quoted(path)} does not exist") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {quoted(path)}: "
                    f"{getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {quoted(path)} is {file_kind(mode)}, not a regular file")
    return path


def check_output_file(path: Path, option: str = "--out") -> Path:
    """``path`` is a file we may create or replace: its folder exists, and it is not a
    folder, FIFO or device itself."""
    folder = path.parent
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise CLIError(f"{option}: output folder {quoted(folder)} {what}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CLIError(f"{option}: cannot use {quoted(path)}: {exc.strerror or exc}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise CLIError(f"{option}: {quoted(path)} is {file_kind(mode)}; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{option}: cannot write to the folder {quoted(folder)} "
                       "(permission denied)")
    return path


# --------------------------------------------------------------------------- user code


@contextlib.contextmanager
def user_import_path() -> Iterator[None]:
    """Append the current folder to ``sys.path`` for the block, then remove it again."""
    for ours in ("nncompress.api", "nncompress.data", "nncompress.models"):
        importlib.import_module(ours)  # our own imports first, never from the user's folder

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def is_reference(text: str) -> bool:
    """``package.module:attribute`` with identifiers on both sides of one colon."""
    module, sep, attr = text.partition(":")
    return bool(sep) and all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))


def _check_module_file(module: str, what: str, error: type[NNCError]) -> None:
    """Refuse a module whose source is not a regular file before importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except Exception as exc:  # a parent package failing to import is bad input
        raise error(f"{what}: cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    if spec is None:
        raise error(f"{what}: no module named {module!r} (looked in the current folder and "
                    "the installed packages)")
    if spec.has_location and spec.origin:
        check_input_file(Path(spec.origin), f"{what}: module file", error)


def import_reference(ref: str, what: str, error: type[NNCError]) -> Any:
    """The object ``ref`` (``module:attr``) names; call inside :func:`user_import_path`."""
    if not is_reference(ref):
        raise error(f"{what} {ref!r} is not a reference of the form package.module:name")
    module_name, _, attr_path = ref.partition(":")
    if module_name not in sys.modules:
        _check_module_file(module_name, what, error)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise error(f"{what}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") \
            from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {ref!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def _call_user(func: Callable[[], Any], what: str) -> Any:
    """``func()`` for a callable named on the command line; its failures are bad input."""
    try:
        pyinspect.signature(func).bind()
    except TypeError:
        raise ModelError(f"{what} must take no arguments") from None
    except ValueError:  # no signature (some builtins): just call it
        pass
    try:
        return func()
    except Exception as exc:
        raise ModelError(f"{what} raised {type(exc).__name__}: {exc}") from None


def model_from_function(ref: str) -> nn.Module:
    """``--model module:function``: the function, called with no arguments, builds the
    model (an ``nn.Module``)."""
    from torch import nn

    with user_import_path():
        func = import_reference(ref, "--model", ModelError)
        if not callable(func):
            raise ModelError(f"--model {ref!r} is not a function")
        model = _call_user(func, f"--model {ref!r}")
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {ref!r} returned {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model.eval()


def skeleton_from_class(ref: str) -> nn.Module:
    """``--model-class module:Class``: ``Class()``, the skeleton a user ``.nnc`` loads into."""
    from torch import nn

    with user_import_path():
        cls = import_reference(ref, "--model-class", ModelError)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelError(f"--model-class {ref!r} is not a torch.nn.Module subclass "
                             f"(got {type(cls).__name__})")
        return _call_user(cls, f"--model-class {ref!r}")


def user_model_class(path: Path) -> str | None:
    """The recorded class of a ``.nnc`` file's user model, or None for a model with a
    builder (a reference model, a zipped pair, ...)."""
    from nncompress import formats

    builder = formats.read_header(path)["arch"]["builder"]
    return None if builder.get("name") is not None else str(builder.get("class"))


def load_model_file(path: Path, model_class: str | None) -> nn.Module:
    """A ``.nnc`` file as a runnable module; a user model needs ``--model-class``."""
    import nncompress.share.composite  # noqa: F401  (registers the multi-model architectures)
    from nncompress import api

    check_input_file(path, "model file")
    if model_class is not None:
        return api.load(path, skeleton=skeleton_from_class(model_class))
    user_class = user_model_class(path)
    if user_class is not None:
        raise ModelError(f"{quoted(path)} holds a user model of class "
                         f"{printable(user_class[:160])}; give "
                         "--model-class package.module:Class (a class whose Class() builds "
                         "that architecture, importable from the current folder)")
    return api.load(path)


def refuse_pickled(spec: str, option: str = "--model") -> None:
    """A model named by a file of a pickle-based format is refused, with what to do
    instead: nncompress never unpickles a file a user hands it (it could run any code)."""
    suffix = os.path.splitext(spec)[1].lower()
    why = PICKLED_SUFFIXES.get(suffix)
    if why is not None:
        raise ModelError(
            f"{option} {quoted(spec)}: nncompress does not load {suffix} files ({why}) and "
            "never unpickles a file it is handed, since unpickling can run any code; "
            "save the model with nncompress.save (a .nnc file), or give "
            f"{option} package.module:function, a function that builds the model and loads "
            "its state dict with torch.load(path, weights_only=True) in your own code")


def looks_like_file(text: str) -> bool:
    """A ``--model`` value that names a file: it ends in ``.nnc`` or exists on disk."""
    return text.endswith(".nnc") or os.path.lexists(text)


def load_model(spec: str, model_class: str | None, option: str = "--model") -> nn.Module:
    """``spec`` as a ``.nnc`` path or ``module:function`` (what ``eval`` / ``inspect`` and
    ``compress`` with a user model take); a pickle-based file is refused."""
    refuse_pickled(spec, option)
    if looks_like_file(spec):
        return load_model_file(Path(spec), model_class)
    if model_class is not None:
        raise CLIError("--model-class is for a .nnc file holding a user model, not for "
                       f"--model {spec!r}")
    if is_reference(spec):
        return model_from_function(spec)
    raise CLIError(f"model {quoted(spec)} is neither an existing .nnc file nor a "
                   "package.module:function reference")


def load_data(name: str, *, seed: int, needs_labels: str | None = None) -> Dataset:
    """``--data``: a bundled dataset, or ``module:function`` imported from the current
    folder too (see :func:`user_import_path`), labelled or inputs only (see
    :mod:`nncompress.data.user`). ``needs_labels``: what needs labels (for the one-line
    error when the data has inputs only)."""
    from nncompress.data import load_dataset

    if ":" not in name:
        data = load_dataset(name, seed=seed)
    else:
        with user_import_path():
            module = name.partition(":")[0]
            if is_reference(name) and module not in sys.modules:
                _check_module_file(module, f"--data {name!r}", DataError)
            data = load_dataset(name, seed=seed)
    if needs_labels is not None and not data.labelled:
        raise DataError(f"{needs_labels} needs labels, but --data {printable(repr(name))} "
                        "gives inputs only")
    return data
