"""Exceptions with messages that name the offending key, value and the valid choices."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["CellflowKeyError", "CellflowValueError", "format_choices"]


def format_choices(choices: Iterable[Any], limit: int = 20) -> str:
    """Render a list of valid choices for an error message, truncated after ``limit``."""
    items = [repr(c) for c in choices]
    if len(items) > limit:
        return "[" + ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)]"
    return "[" + ", ".join(items) + "]"


class CellflowKeyError(KeyError):
    """A key (column, layer, obsm entry, option, perturbation) that does not exist.

    Unlike a bare :class:`KeyError`, ``str(err)`` is the readable message, not its repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CellflowValueError(ValueError):
    """A value that exists but is invalid (NaN cells, misaligned doses, empty groups, ...)."""
