"""nncompress: compress trained PyTorch models into small, fast, packed artifacts.

    import nncompress as nc
    model, data = nc.models.load("cnn1d", dataset="mnist1d")
    result = nc.compress(model, "magnitude-prune", data)
    print(result.table())
    nc.save(result, "model.nnc")

The public names are imported on first use (PEP 562), so ``import nncompress`` and the
command line's ``--help`` stay fast and do not load torch until it is needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access).
_EXPORTS: dict[str, str] = {
    "compress": "nncompress.api",
    "save": "nncompress.api",
    "load": "nncompress.api",
    "compare": "nncompress.api",
    "CompressionResult": "nncompress.api",
    "StageResult": "nncompress.api",
    "Recipe": "nncompress.recipe",
    "Stage": "nncompress.recipe",
    "fit": "nncompress.train",
    "fine_tune": "nncompress.train",
    "evaluate": "nncompress.train",
}
_SUBPACKAGES: tuple[str, ...] = ("data", "models", "formats", "report", "prune", "export",
                                  "runtime")

__all__ = [
    "CompressionResult",
    "Recipe",
    "Stage",
    "StageResult",
    "__version__",
    "compare",
    "compress",
    "data",
    "evaluate",
    "export",
    "fine_tune",
    "fit",
    "formats",
    "load",
    "measure",
    "models",
    "prune",
    "report",
    "runtime",
    "save",
]

if TYPE_CHECKING:
    from nncompress import data, export, formats, models, prune, report, runtime
    from nncompress.api import (
        CompressionResult,
        StageResult,
        compare,
        compress,
        load,
        measure,
        save,
    )
    from nncompress.recipe import Recipe, Stage
    from nncompress.train import evaluate, fine_tune, fit


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type. ``nncompress.measure`` is both a subpackage and the public
    ``measure`` function; importing the subpackage would bind the module to the package's
    ``measure`` attribute, so this property keeps ``nc.measure`` the function. Code that
    wants the subpackage imports from it: ``from nncompress.measure import count_macs``."""

    @property
    def measure(self) -> Any:
        return importlib.import_module("nncompress.api").measure

    @measure.setter
    def measure(self, value: Any) -> None:
        """Ignore the import system binding the subpackage here (see the class doc)."""


sys.modules[__name__].__class__ = _Package
