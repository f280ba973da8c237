"""The contract between the :class:`~cellflow.ResponseModel` facade and a method.

A method turns prepared data into a fitted state (a PyTree of arrays) and a fitted state plus
source cells and a condition into predicted cells. It sees the data layer's arrays and
metadata, never an AnnData, and the facade never looks inside its state.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices
from cellflow.data import Condition, DataSpec, EmbeddingTable, PerturbationData

__all__ = ["Method", "Option"]


#: Arguments of ``ResponseModel.fit``, which users also try as options of the model.
_FIT_ARGUMENTS = ("steps", "batch_size", "seed", "progress", "resume")


@dataclass(frozen=True)
class Option:
    """A documented method hyper-parameter.

    Attributes
    ----------
    default
        Default value (JSON-serialisable).
    doc
        One line for the docs and error messages.
    check
        Returns an error text for an invalid value, or ``None`` if valid.
    """

    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _python_value(value: Any) -> Any:
    """``value`` with numpy scalars (from an array, a grid search), also inside lists and tuples,
    as Python ones: the checks then see ints and floats, and the options save as JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_python_value(v) for v in value)
    return value


class Method(abc.ABC):
    """A way of learning responses. Subclasses set :attr:`name`, :attr:`options` and implement
    :meth:`fit`, :meth:`predict`, :meth:`state_to_arrays` and :meth:`state_from_arrays`."""

    name: str = ""
    summary: str = ""
    options: Mapping[str, Option] = {}
    #: Whether the method fits a process through time-resolved snapshots (``time_key``) and
    #: implements :meth:`predict_path`.
    supports_time: bool = False
    #: Whether the method learns from known (control, treated) pairs (``pair_key``).
    supports_pairs: bool = False

    def validate_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``given``; unknown names and invalid values raise."""
        unknown = [k for k in given if k not in self.options]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.options), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            if unknown[0] in _FIT_ARGUMENTS:
                hint = f" {unknown[0]} is an argument of fit(): model.fit({unknown[0]}={given[unknown[0]]!r})."
            raise CellflowKeyError(
                f"option {unknown[0]!r} is not an option of method {self.name!r};{hint} valid options: "
                f"{format_choices(sorted(self.options), limit=100) if self.options else '[] (this method takes none)'}."
            )
        resolved = {name: option.default for name, option in self.options.items()}
        for name, value in given.items():
            value = _python_value(value)
            problem = self.options[name].check(value) if self.options[name].check else None
            if problem:
                raise CellflowValueError(f"option {name}={value!r} for method {self.name!r} is invalid: {problem}")
            resolved[name] = value
        return resolved

    @abc.abstractmethod
    def fit(
        self,
        data: PerturbationData,
        embeddings: EmbeddingTable,
        options: Mapping[str, Any],
        *,
        steps: int | None,
        batch_size: int | None,
        seed: int,
        progress: bool,
        resume: bool = False,
    ) -> Any:
        """Return the fitted state (a PyTree of arrays); ``resume`` continues from a checkpoint."""

    @abc.abstractmethod
    def predict(
        self,
        state: Any,
        spec: DataSpec,
        embeddings: EmbeddingTable,
        options: Mapping[str, Any],
        source: np.ndarray,
        condition: Condition,
        covariates: tuple[str | None, ...],
        key: jax.Array,
    ) -> np.ndarray:
        """Predict ``(n, d)`` treated cells from ``(n, d)`` source cells under ``condition``."""

    def predict_path(
        self,
        state: Any,
        spec: DataSpec,
        embeddings: EmbeddingTable,
        options: Mapping[str, Any],
        source: np.ndarray,
        condition: Condition,
        covariates: tuple[str | None, ...],
        key: jax.Array,
        clock: np.ndarray,
    ) -> np.ndarray:
        """``(T, n, d)``: the source cells moved along the fitted process to each of ``clock``
        ``(T,)`` (increasing, in ``[0, 1]``; 0 is the controls, 1 the latest snapshot)."""
        raise CellflowValueError(f"method {self.name!r} does not model time; methods that do: see ResponseModel's time_key.")

    @abc.abstractmethod
    def state_to_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """Flatten a state into named numpy arrays for saving."""

    @abc.abstractmethod
    def state_from_arrays(
        self, arrays: Mapping[str, np.ndarray], spec: DataSpec, options: Mapping[str, Any], embeddings: EmbeddingTable
    ) -> Any:
        """Inverse of :meth:`state_to_arrays`."""

    def history(self, state: Any) -> pd.DataFrame:
        """Training curve of a fitted state (empty for closed-form methods)."""
        return pd.DataFrame()
