"""Exceptions with messages that name the offending key, value and the valid choices."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CellflowKeyError", "CellflowValueError", "format_choices", "user_stacklevel"]

_PACKAGE = str(Path(__file__).resolve().parent)


def format_choices(choices: Iterable[Any], limit: int = 20) -> str:
    """Render a list of valid choices for an error message, truncated after ``limit``."""
    # numpy scalars (from obs columns) read as plain numbers, not np.int64(101)
    items = [repr(c.item() if isinstance(c, np.generic) else c) for c in choices]
    if len(items) > limit:
        return "[" + ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)]"
    return "[" + ", ".join(items) + "]"


def user_stacklevel() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by the caller of this function, that
    points at the first frame outside cellflow: the user's line, however deep in the library
    the warning arises."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


class CellflowKeyError(KeyError):
    """A key (column, layer, obsm entry, option, perturbation) that does not exist.

    Unlike a bare :class:`KeyError`, ``str(err)`` is the readable message, not its repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CellflowValueError(ValueError):
    """A value that exists but is invalid (NaN cells, misaligned doses, empty groups, ...)."""
