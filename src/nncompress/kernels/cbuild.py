"""Build nncompress's C kernels with this machine's gcc and load them with ctypes.

Each kernel is one C file ``kernels/c/<name>.c``. :func:`load_library` compiles it with
:data:`FLAGS` (``-march=native``: the build is for this CPU) into
``cache_dir()/kernels/<name>-<hash>.so``, where the hash covers the source, the flags, the
compiler's version and the CPU's feature flags, so an edited source, another compiler or
another CPU (a cache shared over a network) gets its own build. The library is written
under a temporary name and renamed, so concurrent builds never expose a half-written file.
Built once per process (:func:`functools.cache`); no prebuilt binaries are ever fetched.

``python -m nncompress.kernels.cbuild`` builds every ``c/*.c`` (``make`` runs it when it
installs the environment). Where gcc is missing or a build fails,
:class:`~nncompress.errors.KernelUnavailableError` says which library and why; the layers
that use a kernel fall back to their plain-torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nncompress.errors import KernelUnavailableError
from nncompress.paths import cache_dir

__all__ = ["C_DIR", "FLAGS", "available_compiler", "build", "kernel_names", "library_path",
           "load_library", "main"]

#: The directory of the C sources, one library per ``<name>.c``.
C_DIR = Path(__file__).resolve().parent / "c"
#: gcc flags of every kernel build (the output and source paths are added).
FLAGS: tuple[str, ...] = ("-std=c99", "-O3", "-march=native", "-shared", "-fPIC", "-Wall",
                          "-Wextra", "-Werror")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_COMPILER = "gcc"


def available_compiler() -> bool:
    """Whether the C compiler is on ``PATH``."""
    return shutil.which(_COMPILER) is not None


def kernel_names() -> tuple[str, ...]:
    """Names of the C kernels in :data:`C_DIR` (``xnor`` for ``c/xnor.c``), sorted."""
    return tuple(sorted(p.stem for p in C_DIR.glob("*.c") if _NAME.fullmatch(p.stem)))


def _source(name: str) -> Path:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KernelUnavailableError(f"kernel library {name!r}: not a kernel name "
                                     "(lower-case letters, digits and _)")
    path = C_DIR / f"{name}.c"
    if not path.is_file():
        raise KernelUnavailableError(f"kernel library {name!r}: no source {path}")
    return path


@functools.cache
def _compiler_version() -> str:
    """The first line of ``gcc --version``; raises KernelUnavailableError without gcc."""
    exe = shutil.which(_COMPILER)
    if exe is None:
        raise KernelUnavailableError(f"C kernels: {_COMPILER} not found on PATH")
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True,
                              timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailableError(f"C kernels: {_COMPILER} --version failed: "
                                     f"{exc}") from None
    return (done.stdout.splitlines() or ["?"])[0]


def _cpu_features() -> str:
    """The machine and its CPU feature flags (``-march=native`` depends on them)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))),
                         "")
    except OSError:
        pass
    return f"{platform.machine()} {' '.join(sorted(flags.split(':')[-1].split()))}"


def library_path(name: str) -> Path:
    """Where the build of kernel ``name`` for this source, compiler and CPU is cached."""
    source = _source(name)
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(FLAGS).encode(),
                 _compiler_version().encode(), _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "kernels" / f"{name}-{digest.hexdigest()[:16]}.so"


def build(name: str) -> Path:
    """Compile kernel ``name`` unless its cached build exists; return the library's path."""
    target = library_path(name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([_COMPILER, *FLAGS, "-o", tmp, str(_source(name))],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln),
                         done.stderr.strip().splitlines()[0] if done.stderr.strip() else "")
            raise KernelUnavailableError(f"kernel library {name!r}: {_COMPILER} failed "
                                         f"(exit {done.returncode}): {first}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailableError(f"kernel library {name!r}: build failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """The compiled kernel ``name`` (``c/<name>.c``), built on first use, once per process.

    Raises :class:`KernelUnavailableError` (naming the library and why) when gcc is
    missing or the build fails. Callers set ``argtypes`` / ``restype`` of what they use.
    """
    path = build(name)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailableError(f"kernel library {name!r}: cannot load {path}: "
                                     f"{exc}") from None



# Generated sources (the int8 engine: kernels/int8.py) ----------------------------------------

def source_library_path(name: str, source: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """Where the build of generated C ``source`` with ``flags`` is cached: like
    :func:`library_path`, hashed over the source text, flags, compiler and CPU."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KernelUnavailableError(f"generated library {name!r}: not a kernel name "
                                     "(lower-case letters, digits and _)")
    digest = hashlib.sha256()
    for part in (source.encode(), " ".join(flags).encode(), _compiler_version().encode(),
                 _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "kernels" / f"{name}-{digest.hexdigest()[:20]}.so"


def compile_source(name: str, source: str, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """Compile a generated C ``source`` (one translation unit) into a shared library cached
    by hash (written under a temporary name, then renamed) and load it; a second call with
    the same source loads the cached build. Raises KernelUnavailableError (one line) when
    gcc is missing or fails. ``flags`` must build a shared library (``-shared -fPIC``)."""
    target = source_library_path(name, source, tuple(flags))
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
            src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            try:
                done = subprocess.run([_COMPILER, *flags, "-o", str(lib), str(src)],
                                      capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailableError(f"generated library {name!r}: build failed: "
                                             f"{exc}") from None
            if done.returncode != 0:
                first = next((ln for ln in done.stderr.splitlines() if "error" in ln),
                             done.stderr.strip()[:200])
                raise KernelUnavailableError(f"generated library {name!r}: {_COMPILER} failed "
                                             f"(exit {done.returncode}): {first}")
            os.replace(lib, target)
    return _load_path(str(target))


@functools.cache
def _load_path(path: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path)
    except OSError as exc:
        raise KernelUnavailableError(f"cannot load {path}: {exc}") from None

def main(argv: list[str] | None = None) -> int:
    """Build every kernel (or those named); print one line each; 1 if any failed."""
    names = argv if argv else list(kernel_names())
    failed = 0
    for name in names:
        try:
            print(f"kernel {name}: {build(name)}")
        except KernelUnavailableError as exc:
            failed += 1
            print(f"kernel {name}: unavailable: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
