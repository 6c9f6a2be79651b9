"""One generic name -> item registry. Registering a duplicate name raises."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from nncompress.errors import NNCError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to items of one kind (techniques, encodings, models...).

    Items are registered once, at import time of the module that defines them.
    """

    def __init__(self, kind: str, error: type[NNCError] = NNCError) -> None:
        self._kind = kind
        self._error = error
        self._items: dict[str, T] = {}

    @property
    def kind(self) -> str:
        return self._kind

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"duplicate {self._kind} name {name!r}")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._items)) or "none"
            raise self._error(f"unknown {self._kind} {name!r}; known: {known}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
