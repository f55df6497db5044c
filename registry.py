"""A name -> builder registry, shared by encoders and fusion strategies.

Components register themselves with a decorator where they are defined; the
package ``__init__`` imports the modules, so importing the package registers
everything. Nothing keeps a hand-written list of models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps names to builder callables.

    Args:
        kind: what is registered, used in error messages ("encoder", "fusion").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = fn
            return fn

        return decorator

    def create(self, name: str, **kwargs: Any) -> Any:
        if name not in self._builders:
            known = ", ".join(sorted(self._builders)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._builders[name](**kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
