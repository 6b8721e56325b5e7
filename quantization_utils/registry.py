"""Named plug-ins of one kind: the registry class behind every ``register_*`` decorator of the project.

A :class:`Registry` maps names to entries (functions or classes) in order of registration. Registering checks the
entry once: a name is taken only once, a class must subclass the registry's base class, and the docstring must
say what the entry computes. Looking up a name that is not registered raises :class:`UnknownNameError`, which
lists the registered names.

    >>> FILTERS = Registry("filter", base=None, docstring="its formula")
    >>> @FILTERS.register("double")
    ... def double(x):
    ...     '''y = 2 x.'''
    ...     return 2 * x
    >>> FILTERS["double"](3), FILTERS.names()
    (6, ('double',))
    >>> FILTERS["triple"]
    Traceback (most recent call last):
    ...
    quantization_utils.registry.UnknownNameError: no filter is registered as 'triple'; the registered ones: double
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(ValueError):
    """A name that no entry of a registry has; the message lists those that do."""


class Registry:
    """Entries of one ``kind`` by name. ``base``: the class a registered class must subclass (None: functions
    only); ``docstring``: what an entry's docstring must state, for the error that asks for it."""

    def __init__(self, kind: str, base: type | None = None, docstring: str = "what it computes"):
        self.kind, self.base, self.docstring = kind, base, docstring
        self._entries: dict[str, object] = {}

    def register(self, name: str, make: Callable | None = None):
        """Decorator registering a function or a ``base`` subclass under ``name``; ``make`` turns the decorated
        object into what is stored (the object itself by default). Returns the object unchanged."""

        def decorator(entry):
            self._check(name, entry)
            self._entries[name] = entry if make is None else make(entry)
            return entry

        return decorator

    def _check(self, name: str, entry) -> None:
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        if inspect.isclass(entry) and self.base is not None and not issubclass(entry, self.base):
            raise TypeError(f"{self.kind} {name!r}: a class must subclass {self.base.__name__}")
        if not callable(entry) or (inspect.isclass(entry) and self.base is None):
            expected = f"a function or a {self.base.__name__} subclass" if self.base else "a function"
            raise TypeError(f"{self.kind} {name!r}: expected {expected}")
        if not (entry.__doc__ or "").strip():
            raise TypeError(f"{self.kind} {name!r} needs a docstring that states {self.docstring}")

    def __getitem__(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"no {self.kind} is registered as {name!r}; the registered ones: "
                                   f"{', '.join(self._entries)}") from None

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        """The registered names, in order of registration."""
        return tuple(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
