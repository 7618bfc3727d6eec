"""Small helpers that any layer of dag_trl may use; this module imports nothing from dag_trl."""

from __future__ import annotations

from typing import Any


def callable_name(function: Any) -> str:
    """A readable name of a user callable (reward or prompt function) for model cards and error messages: its
    ``name`` attribute (dag_trl's reward and prompt objects), else the wrapped function of a ``functools.partial``,
    its ``__name__`` (plain functions), or its class name (callable objects)."""
    named = getattr(function, "name", None)
    if isinstance(named, str) and named:
        return named
    function = getattr(function, "func", function)
    return getattr(function, "__name__", None) or type(function).__name__
