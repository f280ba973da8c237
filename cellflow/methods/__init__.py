"""Registry of the methods available to :class:`cellflow.ResponseModel`."""

from __future__ import annotations

import pandas as pd

from cellflow._errors import CellflowKeyError, format_choices
from cellflow.methods._base import Method, Option
from cellflow.methods._baselines import GaussianOT, Identity, MeanShift
from cellflow.methods._diffusion import Diffusion
from cellflow.methods._flow_matching import FlowMatching
from cellflow.methods._neural_ot import NeuralOT
from cellflow.methods._schrodinger_bridge import SchrodingerBridge

__all__ = ["Method", "Option", "METHODS", "PLANNED_METHODS", "get_method", "options_table", "register_method"]

METHODS: dict[str, Method] = {}

# Part of the public API contract, not yet implemented in this release.
PLANNED_METHODS: tuple[str, ...] = ()


def register_method(method: Method) -> Method:
    """Make ``method`` available as ``ResponseModel(..., method=method.name)``."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; raises with the list of choices otherwise."""
    if name in METHODS:
        return METHODS[name]
    if name in PLANNED_METHODS:
        raise CellflowKeyError(
            f"method={name!r} is part of the cellflow API but not available in this release; "
            f"available methods: {format_choices(METHODS)}."
        )
    raise CellflowKeyError(f"method={name!r} is unknown; valid choices: {format_choices(METHODS)}.")


def options_table(method: str) -> pd.DataFrame:
    """The options a method takes: one row per option (its name is the index), with its
    ``default`` and its ``description``; what ``ResponseModel(..., method=method, **options)``
    and ``cellflow train --option key=value`` accept.

    Examples
    --------
    >>> cf.methods.options_table("flow_matching").loc[["width", "epsilon"]]
    """
    options = get_method(method).options
    return pd.DataFrame(
        {"default": [o.default for o in options.values()], "description": [o.doc for o in options.values()]},
        index=pd.Index(list(options), name="option"),
    )


for _method in (Identity(), MeanShift(), GaussianOT(), FlowMatching(), NeuralOT(), SchrodingerBridge(), Diffusion()):
    register_method(_method)


def __dir__() -> list[str]:
    # tab completion lists the public names, not this module's imports
    return sorted(__all__)
