"""Name → factory registries that refuse duplicates and suggest close names.

Methods, pipeline stages and adaptation objectives register themselves with a decorator
next to their class; ``qshift`` lists them from here (no hard-coded lists in the CLI).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from qshift.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping of names to objects; registering a name twice is an error."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what}: a name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered (by {self._items[name]!r})")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda obj: self.add(name, obj)

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise InputError(unknown_name(self.what, name, self._items))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def unknown_name(what: str, name: Any, known: Any) -> str:
    """``unknown WHAT 'x' (did you mean 'y'?); known: a, b, c``."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; known: {', '.join(known) or 'none'}"


def lazy_factory(module: str, attr: str, **attrs: Any) -> Callable[..., Any]:
    """A factory that imports ``module.attr`` on first call — registration without the
    import cost (torch) until the thing is used. ``attrs`` are set on the factory
    (e.g. ``primary_option``); ``option_names()`` inspects the real class."""
    import importlib
    import inspect

    def target() -> Any:
        return getattr(importlib.import_module(module), attr)

    def factory(*args: Any, **kwargs: Any) -> Any:
        return target()(*args, **kwargs)

    def option_names() -> set[str] | None:
        sig = inspect.signature(target())
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    factory.option_names = option_names  # type: ignore[attr-defined]
    factory.__name__ = factory.__qualname__ = f"lazy({module}.{attr})"
    for k, v in attrs.items():
        setattr(factory, k, v)
    return factory
