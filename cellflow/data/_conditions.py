"""Parsing perturbation labels (``"A+B"``) and doses (``"1.0+0.5"``) into canonical conditions."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from cellflow._errors import CellflowValueError

__all__ = ["COMBINATION_SEPARATOR", "Condition", "format_dose", "parse_condition"]

COMBINATION_SEPARATOR = "+"


@dataclass(frozen=True, order=True)
class Condition:
    """A perturbation condition: the members of a combination with their doses.

    Members are sorted by name, so ``"B+A"`` and ``"A+B"`` are the same condition; doses stay
    aligned with members. The control condition has no members.

    Attributes
    ----------
    members
        Perturbation names, sorted.
    doses
        One dose per member (``1.0`` where no dose is recorded).
    """

    members: tuple[str, ...]
    doses: tuple[float, ...]

    @property
    def is_control(self) -> bool:
        return not self.members

    @property
    def label(self) -> str:
        """Canonical label, members joined by ``"+"``."""
        return COMBINATION_SEPARATOR.join(self.members)

    @property
    def dose_label(self) -> str:
        """Canonical dose string aligned with :attr:`label`."""
        return COMBINATION_SEPARATOR.join(format_dose(d) for d in self.doses)

    def __len__(self) -> int:
        return len(self.members)


def format_dose(dose: float) -> str:
    """Shortest round-tripping text of a dose (``1.0`` -> ``"1"``, ``0.25`` -> ``"0.25"``)."""
    return f"{dose:g}" if float(f"{dose:g}") == dose else repr(float(dose))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, numbers.Number) and math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _parse_dose_parts(dose: Any, n_members: int, perturbation: str, dose_key: str | None) -> list[float]:
    """One float per (raw) member from a number or a ``"+"``-joined string."""
    where = f" in column {dose_key!r}" if dose_key else ""
    if isinstance(dose, numbers.Number) and not isinstance(dose, bool):
        value = float(dose)
        if not math.isfinite(value):
            raise CellflowValueError(f"dose {dose!r}{where} for perturbation {perturbation!r} is not a finite number.")
        return [value] * n_members  # one number applies to every member of a combination
    text = str(dose).strip()
    parts = [p.strip() for p in text.split(COMBINATION_SEPARATOR)]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CellflowValueError(
            f"dose {dose!r}{where} for perturbation {perturbation!r} does not parse: expected a number or "
            f"numbers joined by '+' aligned with the members (e.g. '1.0+0.5')."
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise CellflowValueError(f"dose {dose!r}{where} for perturbation {perturbation!r} is not finite.")
    if len(values) == 1:
        return values * n_members
    if len(values) != n_members:
        raise CellflowValueError(
            f"dose {dose!r}{where} has {len(values)} parts but perturbation {perturbation!r} has {n_members} "
            f"member(s); give one dose per member joined by '+', or a single number for all."
        )
    return values


def parse_condition(
    perturbation: Any,
    dose: Any = None,
    *,
    control: str,
    dose_key: str | None = None,
    default_dose: float = 1.0,
) -> Condition:
    """Parse a perturbation label and its dose into a canonical :class:`Condition`.

    Parameters
    ----------
    perturbation
        A label such as ``"A"``, ``"A+B"`` or the control value. Members equal to ``control``
        inside a combination (``"control+A"``, as in CRISPR screens) are dropped.
    dose
        ``None``/NaN (then every member gets ``default_dose``), a number (applied to every member),
        or a string of numbers joined by ``"+"`` aligned with the members as written.
    control
        The control value.
    dose_key
        Name of the dose column, only used to make error messages precise.
    default_dose
        Dose of members with no dose.

    Returns
    -------
    The canonical condition; the control condition has no members.
    """
    label = str(perturbation).strip()
    if label == str(control):
        return Condition((), ())
    raw_members = [m.strip() for m in label.split(COMBINATION_SEPARATOR)]
    if any(not m for m in raw_members):
        raise CellflowValueError(
            f"perturbation {perturbation!r} has an empty member; combinations are members joined by "
            f"'{COMBINATION_SEPARATOR}' such as 'A+B'."
        )
    if _is_missing(dose):
        doses = [default_dose] * len(raw_members)
    else:
        doses = _parse_dose_parts(dose, len(raw_members), label, dose_key)
    pairs = [(m, d) for m, d in zip(raw_members, doses) if m != str(control)]
    names = [m for m, _ in pairs]
    if len(set(names)) != len(names):
        raise CellflowValueError(f"perturbation {perturbation!r} lists a member more than once.")
    pairs.sort()
    return Condition(tuple(m for m, _ in pairs), tuple(d for _, d in pairs))
