"""The registry of layer types a ``.nnc`` file may construct, filled by each layer package.

A layer type is a class plus the validators of its constructor arguments. Only registered
types are ever constructed from a file's args (each arg is read from the attribute of the
same name when saving; ``bias`` from whether the module has one). PyTorch's own layers are
registered by :mod:`nncompress.formats.arch`; every other package registers its own layer
types where it defines them::

    from nncompress.formats.layer_types import LAYER_TYPES, LayerType, positive_arg, bool_arg
    LAYER_TYPES.register("QuantLinear", LayerType(QuantLinear, {
        "in_features": positive_arg, "out_features": positive_arg, "bias": bool_arg}))

The container never imports technique packages by name: :func:`layer_types` imports the
packages listed in :data:`LAYER_PACKAGES` (strings, one line per package) the first time
the table is read, the way :data:`nncompress.technique.TECHNIQUE_PACKAGES` works.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from nncompress.errors import FormatError
from nncompress.formats._checks import (
    check_bool,
    check_float,
    check_int,
    check_list,
    check_str,
    fail,
    short,
)
from nncompress.registry import Registry

__all__ = ["LAYER_PACKAGES", "LAYER_TYPES", "LayerType", "Validator", "bool_arg",
           "choice_arg", "float_arg", "fraction_arg", "int_arg", "ints_arg", "layer_types",
           "names_arg", "optional_arg", "padding_arg", "positive_arg", "signed_arg",
           "type_name_of"]

Validator = Callable[[Any, str], Any]
_MAX_WIDTH = 2**31

#: Packages whose import registers layer types (imported by :func:`layer_types`).
LAYER_PACKAGES: tuple[str, ...] = (
    "nncompress.formats.arch",          # PyTorch's own layers
    "nncompress.lowrank.layers",
    "nncompress.share.hashed_layers",
    "nncompress.modules.attention",
    "nncompress.quant.binary",          # binarized layers (BNN / XNOR-Net)
    "nncompress.quant.lowbit",          # 2-8 bit LSQ layers
    "nncompress.quant.int8",            # the integer-only int8 model
)


@dataclass(frozen=True)
class LayerType:
    """One constructible layer type: its class and ``{constructor arg: validator}``.

    A validator takes ``(value, what)`` and returns the checked value or raises FormatError
    naming ``what``. Lists come back as lists; they are passed to the constructor as tuples.
    """

    cls: type[nn.Module]
    args: dict[str, Validator]


#: type name -> LayerType; see the module docstring.
LAYER_TYPES: Registry[LayerType] = Registry("layer type", error=FormatError)


def layer_types() -> Registry[LayerType]:
    """The filled registry: every package of :data:`LAYER_PACKAGES` imported (once; a
    listed package that does not exist, e.g. one not written yet, is skipped, while any
    other import error propagates)."""
    for package in LAYER_PACKAGES:
        if package not in sys.modules:
            _import_if_present(package)
    return LAYER_TYPES


def _import_if_present(package: str) -> None:
    """Import ``package``; skip it only when it (or a parent package) is what is missing."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not missing or (package != missing and not package.startswith(f"{missing}.")):
            raise


def type_name_of(cls: type) -> str | None:
    """The registered name of exactly ``cls`` (not a subclass), or ``None``."""
    table = layer_types()
    return next((n for n in table.names() if table.get(n).cls is cls), None)


# -- validators for constructor args read from a file ------------------------------------

def int_arg(value: Any, what: str) -> int:
    return check_int(value, what, hi=_MAX_WIDTH)


def signed_arg(value: Any, what: str) -> int:
    return check_int(value, what, lo=-64, hi=64)


def positive_arg(value: Any, what: str) -> int:
    return check_int(value, what, lo=1, hi=_MAX_WIDTH)


def ints_arg(value: Any, what: str) -> list[int]:
    return [int_arg(v, what) for v in check_list(value, what, max_len=8)]


def padding_arg(value: Any, what: str) -> str | list[int]:
    if value in ("same", "valid"):
        return value
    return ints_arg(value, what)


def optional_arg(check: Validator) -> Validator:
    return lambda value, what: None if value is None else check(value, what)


def choice_arg(*options: str) -> Validator:
    def check(value: Any, what: str) -> str:
        if value not in options:
            fail(f"{what} must be one of {', '.join(options)}; got {short(value)}")
        return value
    return check


def fraction_arg(value: Any, what: str) -> float:
    number = check_float(value, what)
    if not 0.0 <= number <= 1.0:
        fail(f"{what} must be between 0 and 1, got {number}")
    return number


def names_arg(value: Any, what: str) -> list[str]:
    return [check_str(v, what) for v in check_list(value, what, max_len=100_000)]


bool_arg = check_bool
float_arg = check_float
