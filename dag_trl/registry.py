"""Name -> factory registries, shared by the reward functions and the prompt sets.

A registry maps a name (what configs and the command line pass, e.g. ``"aesthetic_score"``) to the class or
function that builds the object. Registering the classes themselves, rather than wrapper functions that repeat
their arguments, keeps each name's keyword arguments exactly those of its class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, MutableMapping
from typing import Any, Generic, TypeVar, overload

__all__ = ["Registry", "register_unique"]

T = TypeVar("T")
Factory = TypeVar("Factory", bound=Callable[..., Any])


def register_unique(mapping: MutableMapping[str, T], kind: str, name: str, value: T) -> T:
    """Add ``value`` to ``mapping`` under ``name`` and return it: the one rule of every registration in dag_trl.

    Registering the same value twice under one name is allowed (a module imported again); another value under a
    taken name raises ``ValueError``, so that a plug-in cannot silently replace a built-in.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string; got {name!r}")
    registered = mapping.get(name)
    if registered is not None and registered is not value:
        raise ValueError(f"{kind} {name!r} is already registered to {registered!r}; choose another name")
    mapping[name] = value
    return value


class Registry(Generic[T]):
    """Factories by name for one kind of object (``Registry("reward")``, ``Registry("prompt set")``).

    ``register(name, factory)`` adds one (also usable as a decorator, ``@REWARDS.register("my_reward")``);
    ``get(name, **kwargs)`` builds one; ``names()`` lists them.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    @overload
    def register(self, name: str, factory: None = None) -> Callable[[Factory], Factory]: ...

    @overload
    def register(self, name: str, factory: Factory) -> Factory: ...

    def register(self, name: str, factory: Factory | None = None) -> Factory | Callable[[Factory], Factory]:
        """Register ``factory`` (a class or a function) under ``name`` and return it unchanged.

        Without ``factory``, returns a decorator that registers what it decorates. A name is taken once
        (:func:`register_unique`).
        """
        if factory is None:
            return lambda decorated: self.register(name, decorated)
        if not callable(factory):
            raise TypeError(f"the factory of {self.kind} {name!r} must be callable; got {factory!r}")
        return register_unique(self._factories, self.kind, name, factory)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def factory(self, name: str) -> Callable[..., T]:
        """The class or function registered under ``name``; ``ValueError`` listing the known names if none is."""
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        return self._factories[name]

    def get(self, name: str, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with ``kwargs``.

        Raises ``ValueError`` for an unknown name, and ``TypeError`` naming the accepted keyword arguments when
        ``kwargs`` do not fit the factory (an unknown or a missing argument), before anything is built.
        """
        factory = self.factory(name)
        signature = inspect.signature(factory)
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            accepted = [
                parameter.name
                for parameter in signature.parameters.values()
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            ]
            raise TypeError(
                f"cannot build {self.kind} {name!r}: {error}; accepted keyword arguments: {', '.join(accepted)}"
            ) from None
        return factory(**kwargs)

    def resolve(self, name_or_object: str | T, **kwargs: Any) -> T:
        """:meth:`get` for a name; an already built object (anything callable) is returned unchanged.

        Keyword arguments cannot apply to a built object, so passing any with one raises ``ValueError``.
        """
        if isinstance(name_or_object, str):
            return self.get(name_or_object, **kwargs)
        if not callable(name_or_object):
            raise ValueError(f"expected a {self.kind} name or a built {self.kind}; got {name_or_object!r}")
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} cannot be applied to an already built {self.kind} "
                f"{name_or_object!r}"
            )
        return name_or_object

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
