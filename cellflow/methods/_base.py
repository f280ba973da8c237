"""The contract between the :class:`~cellflow.ResponseModel` facade and a method.

A method turns prepared data into a fitted state (a PyTree of arrays) and a fitted state plus
source cells and a condition into predicted cells. It sees the data layer's arrays and
metadata, never an AnnData, and the facade never looks inside its state.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices
from cellflow.data import Condition, DataSpec, EmbeddingTable, PerturbationData

__all__ = ["Method", "Option"]


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


class Method(abc.ABC):
    """A way of learning responses. Subclasses set :attr:`name`, :attr:`options` and implement
    :meth:`fit`, :meth:`predict`, :meth:`state_to_arrays` and :meth:`state_from_arrays`."""

    name: str = ""
    summary: str = ""
    options: Mapping[str, Option] = {}

    def validate_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``given``; unknown names and invalid values raise."""
        unknown = [k for k in given if k not in self.options]
        if unknown:
            raise CellflowKeyError(
                f"option {unknown[0]!r} is not an option of method {self.name!r}; valid options: "
                f"{format_choices(sorted(self.options)) if self.options else '[] (this method takes none)'}."
            )
        resolved = {name: option.default for name, option in self.options.items()}
        for name, value in given.items():
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
    ) -> Any:
        """Return the fitted state (a PyTree of arrays)."""

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

    @abc.abstractmethod
    def state_to_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """Flatten a state into named numpy arrays for saving."""

    @abc.abstractmethod
    def state_from_arrays(self, arrays: Mapping[str, np.ndarray], spec: DataSpec, options: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`state_to_arrays`."""
