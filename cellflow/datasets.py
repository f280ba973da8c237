"""Datasets: a synthetic perturbation generator with known ground truth, and file readers.

:func:`synthetic` draws an :class:`anndata.AnnData` of control and perturbed cells (single drugs at
several doses, drug combinations) from a generative model whose true response is exposed as a
:class:`SyntheticTruth` callable, so that predictions for *any* condition -- including held-out
combinations and unseen doses -- can be scored against the exact answer.

:func:`read` loads ``.h5ad``, ``.csv``/``.tsv`` (optionally compressed) and ``.parquet`` files into an
AnnData.

The synthetic model
-------------------
Units are "within-state standard deviations": every state's covariance has mean per-dimension
variance 1.

*States.* ``S`` centres :math:`c_s` in ``d`` dimensions, pairwise distance :data:`CENTRE_DISTANCE`
(8 within-state std) when ``S <= d``. Within state ``s`` a cell is :math:`c_s + Q_s\\,\\mathrm{diag}(
\\sigma_s)\\,z`, :math:`z \\sim N(0, I)`, with a random rotation :math:`Q_s` and anisotropic scales
:math:`\\sigma_s` (log-uniform in [0.5, 2], rescaled to root-mean-square 1).

*Patients.* Patient ``p`` draws its state with probabilities
:math:`w_p = f + (1 - S f)\\,\\mathrm{Dirichlet}(1, \\dots, 1)` with floor :math:`f = \\min(0.1, 0.5/S)`
(so every state has weight >= 0.1 whenever ``S <= 9``), and adds a small offset :math:`b_p \\sim
N(0, 0.1^2 I)` to every cell.

*Single drug* ``k`` at dose ``D``:

.. math::

    \\delta_k(x, D) = H_k(D)\\,\\Big[\\sum_s g_s(x)\\, r_{k,s} + W_k \\tanh(U_k x + a_k)\\Big],
    \\qquad H_k(D) = \\frac{D^{n_k}}{D^{n_k} + \\mathrm{EC50}_k^{n_k}},

with soft state memberships :math:`g(x) = \\mathrm{softmax}_s(-\\lVert x - c_s\\rVert^2 / \\tau)`,
:math:`\\tau = \\mathrm{CENTRE\\_DISTANCE}^2 / 3`, state responses :math:`r_{k,s}` (random directions,
norm uniform in [3, 4.5]), a smooth nonlinear term (``U_k``: 8 x d, entries :math:`N(0, 0.25^2)`;
``W_k``: d x 8, entries :math:`N(0, 0.3^2)`; ``a_k``: :math:`N(0, 0.5^2)`), EC50 log-uniform in
[0.5, 2] and Hill coefficient :math:`n_k` uniform in [1, 2].

*Combination* of members ``M`` at doses :math:`D_m`:

.. math::

    \\delta_M(x) = \\sum_{m \\in M} \\delta_m(x, D_m)
        + \\sum_{\\{i, j\\} \\subseteq M \\text{ synergistic}} H_i(D_i) H_j(D_j) \\sum_s g_s(x)\\, q_{ij,s},

with interaction vectors :math:`q_{ij,s}` of norm uniform in [6, 8]. Non-synergistic pairs are
exactly additive.

*Measured treated cell* = :math:`x + \\delta(x) + \\varepsilon`, :math:`\\varepsilon \\sim
N(0, \\mathrm{noise\\_std}^2 I)`, where ``x`` is a fresh control draw of the same patient (each
measured cell is destroyed by measurement, so treated and control cells are different cells).

All random quantities come from :func:`numpy.random.default_rng` seeded by a
:class:`numpy.random.SeedSequence` of ``seed`` and a stable key (e.g. the drug name), so results are
identical across runs and platforms for the same arguments.
"""

from __future__ import annotations

import itertools
import re
import warnings
import zlib
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel

__all__ = ["SyntheticTruth", "synthetic", "time_course", "read", "read_embeddings", "format_dose", "CONTROL", "SUPPORTED_SUFFIXES"]

#: Name of the untreated condition in ``obs["condition"]``.
CONTROL = "control"
#: Distance between state centres, in within-state standard deviations (when ``n_states <= n_features``).
CENTRE_DISTANCE = 8.0
#: File suffixes understood by :func:`read` (table formats may additionally end in a compression suffix).
SUPPORTED_SUFFIXES = (".h5ad", ".csv", ".tsv", ".parquet", ".pq", ".npz")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")

_N_HIDDEN = 8
_RESPONSE_NORM = (3.0, 4.5)
_SYNERGY_NORM = (6.0, 8.0)
_EC50_RANGE = (0.5, 2.0)
_HILL_RANGE = (1.0, 2.0)
_OFFSET_STD = 0.1
_SCALE_RANGE = (0.5, 2.0)

# "+" separates doses, except the "+" of an exponent such as "1e+05" (a digit or point, then e);
# member names split at every "+", so that drug "E" pairs as "E+F"
_DOSE_SPLIT = re.compile(r"(?<![0-9.][eE])\+")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _key(part: int | str) -> int:
    """Stable 32-bit integer for a seed-sequence entry (``hash`` of a str is salted per process)."""
    if isinstance(part, str):
        return zlib.crc32(part.encode("utf-8"))
    return int(part)


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent generator for ``(seed, *keys)``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(k) for k in keys)]))


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CellflowValueError(f"{name} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CellflowValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise CellflowValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _drug_names(n: int) -> list[str]:
    """``"A", "B", ..., "Z", "AA", "AB", ...`` (spreadsheet-column style)."""
    names = []
    for i in range(n):
        name, j = "", i
        while True:
            name = chr(ord("A") + j % 26) + name
            j = j // 26 - 1
            if j < 0:
                break
        names.append(name)
    return names


def format_dose(dose: float) -> str:
    """Canonical string of one dose: ``1 -> "1.0"``, ``0.1 -> "0.1"``, ``1e-5 -> "1e-05"``."""
    return repr(float(dose))


def _check_dose_value(value: Any, name: str) -> float:
    try:
        dose = float(value)
    except (TypeError, ValueError):
        raise CellflowValueError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(dose) or dose < 0:
        raise CellflowValueError(f"{name} must be a finite non-negative number, got {value!r}.")
    return dose


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # Haar-distributed


def _random_vectors(rng: np.random.Generator, shape: tuple[int, ...], norm_range: tuple[float, float]) -> np.ndarray:
    """Random directions (last axis) with norms uniform in ``norm_range``."""
    v = rng.standard_normal(shape)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return v * rng.uniform(*norm_range, size=shape[:-1] + (1,))


# --------------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------------
class SyntheticTruth:
    """The exact generative model behind :func:`synthetic`; callable as the true response.

    Parameters are drawn deterministically from ``seed`` (see the module docstring for the formulas);
    two instances built with the same arguments are identical.

    Parameters
    ----------
    n_features
        Dimension ``d`` of a cell.
    n_states
        Number of cell states ``S``.
    n_patients
        Number of patients, named ``"P1" .. "P{n_patients}"``.
    n_drugs
        Number of drugs, named ``"A", "B", ...``.
    synergy_pairs
        Unordered drug pairs (tuples or ``"A+B"`` strings) that interact; every other pair is
        exactly additive. ``None``: a deterministic choice of about half of all pairs.
    noise_std
        Standard deviation of the isotropic treatment noise added to each treated cell.
    seed
        Non-negative integer seed.

    Attributes
    ----------
    drugs : tuple[str, ...]
        Drug names, length ``n_drugs``.
    patients : tuple[str, ...]
        Patient names, length ``n_patients``.
    states : tuple[str, ...]
        State names ``"S0" .. "S{S-1}"``.
    synergy_pairs : tuple[tuple[str, str], ...]
        Sorted pairs of sorted drug names that interact.
    n_features, n_states : int
    noise_std : float
    centres : np.ndarray, shape (S, d)
        State centres.
    state_factors : np.ndarray, shape (S, d, d)
        ``Q_s diag(sigma_s)``: a state-``s`` cell is ``centres[s] + state_factors[s] @ z``.
    state_weights : np.ndarray, shape (n_patients, S)
        Each patient's state mixture (rows sum to 1).
    patient_offsets : np.ndarray, shape (n_patients, d)
        Each patient's baseline offset.
    temperature : float
        ``tau`` of the soft state memberships.
    ec50, hill_coefficient : dict[str, float]
        Hill-curve parameters per drug.
    """

    def __init__(
        self,
        n_features: int = 20,
        n_states: int = 3,
        n_patients: int = 4,
        n_drugs: int = 4,
        *,
        synergy_pairs: Iterable[Sequence[str] | str] | None = None,
        noise_std: float = 0.3,
        seed: int = 0,
    ) -> None:
        d = self.n_features = _check_positive_int(n_features, "n_features")
        S = self.n_states = _check_positive_int(n_states, "n_states")
        self.n_patients = _check_positive_int(n_patients, "n_patients")
        self.n_drugs = _check_positive_int(n_drugs, "n_drugs")
        self.seed = _check_seed(seed)
        noise = _check_dose_value(noise_std, "noise_std")
        self.noise_std = noise

        self.drugs: tuple[str, ...] = tuple(_drug_names(self.n_drugs))
        self.patients: tuple[str, ...] = tuple(f"P{i + 1}" for i in range(self.n_patients))
        self.states: tuple[str, ...] = tuple(f"S{s}" for s in range(S))
        self._drug_index = {k: i for i, k in enumerate(self.drugs)}
        self._patient_index = {p: i for i, p in enumerate(self.patients)}

        # states -----------------------------------------------------------------------------
        rng = _rng(self.seed, "centres")
        if S == 1:
            centres = np.zeros((1, d))
        elif S <= d:  # orthonormal directions: every pair exactly CENTRE_DISTANCE apart
            centres = _random_rotation(rng, d)[:S] * (CENTRE_DISTANCE / np.sqrt(2.0))
        else:  # more states than dimensions: random points of the same typical spread
            centres = rng.standard_normal((S, d)) * (CENTRE_DISTANCE / np.sqrt(2.0 * d))
        self.centres = centres
        factors = np.empty((S, d, d))
        for s in range(S):
            r = _rng(self.seed, "state", s)
            scales = np.exp(r.uniform(np.log(_SCALE_RANGE[0]), np.log(_SCALE_RANGE[1]), size=d))
            scales /= np.sqrt(np.mean(scales**2))
            factors[s] = _random_rotation(r, d) * scales
        self.state_factors = factors
        self.temperature = CENTRE_DISTANCE**2 / 3.0

        # patients ---------------------------------------------------------------------------
        floor = min(0.1, 0.5 / S)
        weights = np.empty((self.n_patients, S))
        offsets = np.empty((self.n_patients, d))
        for i, p in enumerate(self.patients):
            r = _rng(self.seed, "patient", p)
            weights[i] = floor + (1.0 - S * floor) * r.dirichlet(np.ones(S))
            offsets[i] = r.normal(0.0, _OFFSET_STD, size=d)
        self.state_weights = weights / weights.sum(axis=1, keepdims=True)
        self.patient_offsets = offsets

        # drugs ------------------------------------------------------------------------------
        self.ec50: dict[str, float] = {}
        self.hill_coefficient: dict[str, float] = {}
        self._state_response: dict[str, np.ndarray] = {}  # (S, d)
        self._u: dict[str, np.ndarray] = {}  # (H, d)
        self._a: dict[str, np.ndarray] = {}  # (H,)
        self._w: dict[str, np.ndarray] = {}  # (d, H)
        for k in self.drugs:
            r = _rng(self.seed, "drug", k)
            self.ec50[k] = float(np.exp(r.uniform(np.log(_EC50_RANGE[0]), np.log(_EC50_RANGE[1]))))
            self.hill_coefficient[k] = float(r.uniform(*_HILL_RANGE))
            self._state_response[k] = _random_vectors(r, (S, d), _RESPONSE_NORM)
            self._u[k] = r.normal(0.0, 0.25, size=(_N_HIDDEN, d))
            self._a[k] = r.normal(0.0, 0.5, size=_N_HIDDEN)
            self._w[k] = r.normal(0.0, 0.3, size=(d, _N_HIDDEN))

        # synergy ----------------------------------------------------------------------------
        all_pairs = list(itertools.combinations(self.drugs, 2))
        if synergy_pairs is None:
            r = _rng(self.seed, "synergy_pairs")
            n_syn = int(np.ceil(len(all_pairs) / 2))
            chosen = sorted(r.permutation(len(all_pairs))[:n_syn].tolist())
            pairs = [all_pairs[i] for i in chosen]
        else:
            pairs = sorted({self._parse_pair(p, "synergy_pairs") for p in synergy_pairs})
        self.synergy_pairs: tuple[tuple[str, str], ...] = tuple(sorted(pairs))
        self._synergy: dict[tuple[str, str], np.ndarray] = {
            pair: _random_vectors(_rng(self.seed, "synergy", "+".join(pair)), (S, d), _SYNERGY_NORM)
            for pair in self.synergy_pairs
        }

    # ------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"SyntheticTruth(n_features={self.n_features}, n_states={self.n_states}, "
            f"patients={list(self.patients)}, drugs={list(self.drugs)}, "
            f"synergy_pairs={['+'.join(p) for p in self.synergy_pairs]}, noise_std={self.noise_std}, seed={self.seed})"
        )

    def _check_drug(self, name: Any, argument: str, *, control_ok: bool = False) -> str:
        if name not in self._drug_index:
            also = f" (or {CONTROL!r} alone)" if control_ok else ""
            raise CellflowKeyError(
                f"{argument}: unknown drug {name!r}; valid drugs: {format_choices(self.drugs)}{also}."
            )
        return name

    def _parse_pair(self, pair: Sequence[str] | str, argument: str) -> tuple[str, str]:
        members = pair.split("+") if isinstance(pair, str) else list(pair)
        if len(members) != 2 or members[0] == members[1]:
            raise CellflowValueError(f"{argument}: each entry must be a pair of two different drugs, got {pair!r}.")
        for m in members:
            self._check_drug(m, argument)
        return tuple(sorted(members))  # type: ignore[return-value]

    def _check_patient(self, patient: Any) -> int:
        if patient not in self._patient_index:
            raise CellflowKeyError(f"patient={patient!r} is unknown; valid patients: {format_choices(self.patients)}.")
        return self._patient_index[patient]

    def _check_source(self, source: Any) -> np.ndarray:
        x = np.asarray(source, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise CellflowValueError(
                f"source must have shape (n_cells, {self.n_features}), got shape {np.shape(source)}."
            )
        return x

    def parse(self, perturbation: str, dose: float | str | Sequence[float] | None = None) -> dict[str, float]:
        """Members and per-member doses of a condition.

        Parameters
        ----------
        perturbation
            ``"control"``, a drug (``"A"``) or drugs joined by ``"+"`` in any order (``"B+A"``).
        dose
            ``None`` (1.0 per member), one number (every member), or a ``"1.0+0.5"`` string / a
            sequence of numbers aligned with the members *as written* in ``perturbation``.
            Ignored for ``"control"`` unless it is non-zero, which raises.

        Returns
        -------
        dict
            ``{drug: dose}`` (empty for control).

        Raises
        ------
        CellflowKeyError
            An unknown drug name (the message lists the valid ones).
        CellflowValueError
            A dose whose number of parts differs from the number of members, a negative or
            non-numeric dose, or a repeated member.
        """
        if not isinstance(perturbation, str):
            raise CellflowKeyError(
                f"perturbation must be a string such as 'A' or 'A+B', got {perturbation!r}; "
                f"valid drugs: {format_choices(self.drugs)}."
            )
        if perturbation == CONTROL:
            if dose is not None:
                parts = _DOSE_SPLIT.split(dose) if isinstance(dose, str) else np.atleast_1d(dose).tolist()
                if any(_check_dose_value(p, "dose") != 0 for p in parts):
                    raise CellflowValueError(f"dose={dose!r} must be None or 0 for perturbation={CONTROL!r}.")
            return {}
        members = [m.strip() for m in perturbation.split("+")]
        for m in members:
            self._check_drug(m, f"perturbation={perturbation!r}", control_ok=True)
        if len(set(members)) != len(members):
            raise CellflowValueError(f"perturbation={perturbation!r} names a drug more than once.")
        if dose is None:
            doses = [1.0] * len(members)
        elif isinstance(dose, str):
            parts = _DOSE_SPLIT.split(dose)
            if len(parts) != len(members):
                raise CellflowValueError(
                    f"dose={dose!r} has {len(parts)} part(s) but perturbation={perturbation!r} has "
                    f"{len(members)} member(s); give one dose per member joined by '+', e.g. "
                    f"{'+'.join(['1.0'] * len(members))!r}."
                )
            doses = [_check_dose_value(p, f"dose={dose!r}") for p in parts]
        elif np.ndim(dose) == 0:
            doses = [_check_dose_value(dose, "dose")] * len(members)
        else:
            parts = list(dose)  # type: ignore[arg-type]
            if len(parts) != len(members):
                raise CellflowValueError(
                    f"dose={dose!r} has {len(parts)} value(s) but perturbation={perturbation!r} has "
                    f"{len(members)} member(s)."
                )
            doses = [_check_dose_value(p, f"dose={dose!r}") for p in parts]
        return dict(zip(members, doses, strict=True))

    # ------------------------------------------------------------------------------------------
    def hill(self, drug: str, dose: float | np.ndarray) -> float | np.ndarray:
        """Hill response ``H_k(dose) = dose^n / (dose^n + EC50^n)`` in [0, 1) of ``drug``."""
        self._check_drug(drug, "drug")
        dose = np.asarray(dose, dtype=np.float64)
        n, ec = self.hill_coefficient[drug], self.ec50[drug]
        out = dose**n / (dose**n + ec**n)
        return float(out) if out.ndim == 0 else out

    def memberships(self, source: np.ndarray) -> np.ndarray:
        """Soft state memberships ``g(x)``, shape ``(n, S)``, rows summing to 1."""
        x = self._check_source(source)
        sq = ((x[:, None, :] - self.centres[None]) ** 2).sum(-1)  # (n, S)
        logits = -sq / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        g = np.exp(logits)
        return g / g.sum(axis=1, keepdims=True)

    def _single(self, x: np.ndarray, g: np.ndarray, drug: str, h: float) -> np.ndarray:
        inner = g @ self._state_response[drug] + np.tanh(x @ self._u[drug].T + self._a[drug]) @ self._w[drug].T
        return h * inner

    def displacement(
        self,
        source: np.ndarray,
        perturbation: str,
        dose: float | str | Sequence[float] | None = None,
        *,
        synergy: bool = True,
    ) -> np.ndarray:
        """Noise-free displacement ``delta(x)`` of each source cell, shape ``(n, d)``, float64.

        Parameters
        ----------
        source
            Cells, shape ``(n, d)``.
        perturbation, dose
            As in :meth:`parse`.
        synergy
            ``False`` drops the interaction terms (the purely additive prediction).
        """
        x = self._check_source(source)
        members = self.parse(perturbation, dose)
        out = np.zeros_like(x)
        if not members:
            return out
        g = self.memberships(x)
        hills = {k: self.hill(k, v) for k, v in members.items()}
        for k, h in hills.items():
            out += self._single(x, g, k, h)
        if synergy:
            for pair in itertools.combinations(sorted(members), 2):
                if pair in self._synergy:
                    out += (hills[pair[0]] * hills[pair[1]]) * (g @ self._synergy[pair])
        return out

    def __call__(
        self,
        source: np.ndarray,
        perturbation: str,
        dose: float | str | Sequence[float] | None = None,
        seed: int = 0,
        *,
        noise: bool = True,
        synergy: bool = True,
    ) -> np.ndarray:
        """Push source cells through the true response of ``perturbation`` at ``dose``.

        Works for any condition built from the known drugs, including combinations and doses
        absent from the generated AnnData.

        Parameters
        ----------
        source
            Cells to treat, shape ``(n, d)``.
        perturbation
            ``"control"``, ``"A"``, ``"A+B"``, ``"B+A+C"``, ...
        dose
            ``None`` -> 1.0 for every member; a number -> that dose for every member; a string
            ``"1.0+0.5"`` (or a sequence) aligned with the members as written in ``perturbation``.
        seed
            Seed of the treatment noise.
        noise
            ``False`` returns the noise-free ``x + delta(x)``.
        synergy
            ``False`` drops the interaction terms of synergistic pairs: the purely additive
            response, what a perfect prediction from the members of a combination gives.

        Returns
        -------
        np.ndarray, shape ``(n, d)``, float32
            ``x + delta(x) + eps`` with ``eps ~ N(0, noise_std^2 I)``. For ``"control"`` a
            noise-free copy of ``source`` (control cells carry no treatment noise).

        Raises
        ------
        CellflowKeyError
            Unknown drug name.
        CellflowValueError
            Wrong source shape, or a dose string whose number of parts differs from the number
            of members.
        """
        x = self._check_source(source)
        seed = _check_seed(seed)
        if not self.parse(perturbation, dose):
            return x.astype(np.float32)
        out = x + self.displacement(x, perturbation, dose, synergy=synergy)
        if noise and self.noise_std > 0:
            out += _rng(seed, "treatment_noise").normal(0.0, self.noise_std, size=out.shape)
        return out.astype(np.float32)

    # ------------------------------------------------------------------------------------------
    def _draw_control(self, n: int, patient: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        i = self._check_patient(patient)
        states = rng.choice(self.n_states, size=n, p=self.state_weights[i])
        z = rng.standard_normal((n, self.n_features))
        x = self.centres[states] + self.patient_offsets[i]
        for s in range(self.n_states):
            in_s = states == s
            x[in_s] += z[in_s] @ self.state_factors[s].T
        return x, states

    def sample_control(self, n: int, patient: str, seed: int = 0, *, return_state: bool = False):
        """Fresh control cells of ``patient``.

        Parameters
        ----------
        n
            Number of cells.
        patient
            ``"P1"``, ``"P2"``, ...
        seed
            Non-negative integer seed.
        return_state
            Also return the ground-truth state index of each cell.

        Returns
        -------
        np.ndarray, shape ``(n, d)``, float32 -- and, with ``return_state``, an int array of shape ``(n,)``.
        """
        n = _check_count(n, "n")
        x, states = self._draw_control(n, patient, _rng(_check_seed(seed), "control", patient))
        x = x.astype(np.float32)
        return (x, states) if return_state else x

    def sample(
        self,
        perturbation: str,
        n: int,
        patient: str,
        dose: float | str | Sequence[float] | None = None,
        seed: int = 0,
        *,
        return_state: bool = False,
        synergy: bool = True,
    ):
        """Fresh control cells of ``patient`` pushed through ``perturbation`` at ``dose`` (with noise).

        Same distribution as the AnnData's cells of that condition, dose and patient; with
        ``synergy=False`` the same cells without the interaction terms (see :meth:`__call__`).

        Returns
        -------
        np.ndarray, shape ``(n, d)``, float32 -- and, with ``return_state``, the state index of the
        underlying control cells, shape ``(n,)``.
        """
        n = _check_count(n, "n")
        seed = _check_seed(seed)
        self.parse(perturbation, dose)  # validate before drawing
        x, states = self._draw_control(n, patient, _rng(seed, "control", patient))
        out = self(x, perturbation, dose, seed=seed, synergy=synergy)
        return (out, states) if return_state else out


# --------------------------------------------------------------------------------------------------
# synthetic AnnData
# --------------------------------------------------------------------------------------------------
def _condition_name(members: Iterable[str]) -> str:
    return "+".join(sorted(members))


def synthetic(
    n_features: int = 20,
    n_states: int = 3,
    n_patients: int = 4,
    n_drugs: int = 4,
    doses: Sequence[float] = (0.1, 1.0, 10.0),
    combinations: str | Iterable[Sequence[str] | str] = "all_pairs",
    synergy_pairs: Iterable[Sequence[str] | str] | None = None,
    n_control: int = 400,
    n_cells: int = 150,
    seed: int = 0,
    *,
    combination_doses: Sequence[float | Sequence[float]] = (1.0,),
    noise_std: float = 0.3,
) -> tuple[ad.AnnData, SyntheticTruth]:
    """Draw a perturbation data set with known ground truth.

    See the module docstring for the generative model.

    Parameters
    ----------
    n_features
        Number of features ``d`` (``var_names`` ``"f0" .. "f{d-1}"``).
    n_states
        Number of ground-truth cell states.
    n_patients
        Number of patients ``"P1" .. "P{n}"``.
    n_drugs
        Number of drugs ``"A", "B", ...``.
    doses
        Doses at which every single drug is measured (positive numbers).
    combinations
        ``"all_pairs"`` (every unordered pair of drugs), or an explicit list of combinations as
        tuples ``("A", "B")`` or strings ``"A+B"`` (two or more distinct drugs each); ``[]`` for none.
    synergy_pairs
        Interacting drug pairs. ``None``: a deterministic (seeded) choice of ``ceil(m / 2)`` of the
        ``m`` pairs among the measured combinations' pairs plus ``ceil(m' / 2)`` of the ``m'``
        remaining pairs, so that both measured and held-out combinations include synergistic and
        additive ones whenever there are at least two of each.
    n_control
        Control cells per patient.
    n_cells
        Cells per patient for each single drug at each dose and each combination at each
        combination dose.
    seed
        Non-negative integer seed; the output is a deterministic function of all arguments.
    combination_doses
        Doses at which every combination is measured: a number gives every member that dose; a
        sequence gives per-member doses aligned with the *sorted* members.
    noise_std
        Standard deviation of the isotropic treatment noise.

    Returns
    -------
    adata : anndata.AnnData
        ``X`` float32 of shape ``(n_patients * (n_control + n_cells * (n_drugs * len(doses) +
        n_combinations * len(combination_doses))), n_features)``; cells ordered by patient, then
        condition (control, singles, combinations), then dose. ``obs``:

        - ``condition``: categorical, ``"control"``, ``"A"``, ..., ``"A+B"``, ... (members sorted);
        - ``dose``: str, ``"0"`` for control, ``"1.0"`` for singles, ``"1.0+1.0"`` for combinations
          (aligned with the members in ``condition``);
        - ``patient``: categorical ``"P1" .. "P{n}"``;
        - ``state``: categorical ground-truth state ``"S0" ..`` (of the underlying control cell).

        ``uns["synthetic"]``: the generator parameters (h5ad-writable).
    truth : SyntheticTruth
        The exact response model (``truth(source, "A+B", dose)``).

    Raises
    ------
    CellflowKeyError
        A combination or synergy pair names an unknown drug.
    CellflowValueError
        Invalid sizes, doses or combination specifications.

    Examples
    --------
    >>> adata, truth = synthetic(seed=1)
    >>> x0 = truth.sample_control(100, "P1")
    >>> x1 = truth(x0, "C+D", dose="10.0+0.1")
    """
    seed = _check_seed(seed)
    n_control = _check_count(n_control, "n_control")
    n_cells = _check_count(n_cells, "n_cells")
    n_drugs = _check_positive_int(n_drugs, "n_drugs")
    dose_values = [_check_dose_value(d, "doses") for d in np.atleast_1d(np.asarray(doses, dtype=object)).tolist()]
    if not dose_values or any(d <= 0 for d in dose_values) or len(set(dose_values)) != len(dose_values):
        raise CellflowValueError(f"doses must be distinct positive numbers, got {doses!r}.")

    # Build the truth without synergy first, to validate names, then with the chosen pairs.
    drugs = _drug_names(n_drugs)
    probe = SyntheticTruth(1, 1, 1, n_drugs, synergy_pairs=[], noise_std=noise_std, seed=seed)

    if isinstance(combinations, str):
        if combinations != "all_pairs":
            raise CellflowValueError(
                f"combinations={combinations!r} is not understood; valid choices: 'all_pairs' or a list "
                f"such as [('A', 'B'), 'B+C']."
            )
        combos = [tuple(p) for p in itertools.combinations(drugs, 2)]
    else:
        combos = []
        for c in combinations:
            members = c.split("+") if isinstance(c, str) else list(c)
            for m in members:
                probe._check_drug(m, f"combinations entry {c!r}")
            if len(members) < 2 or len(set(members)) != len(members):
                raise CellflowValueError(
                    f"combinations entry {c!r} must name two or more different drugs."
                )
            key = tuple(sorted(members))
            if key not in combos:
                combos.append(key)

    if synergy_pairs is None:
        measured = sorted({p for c in combos for p in itertools.combinations(c, 2)})
        held_out = [p for p in itertools.combinations(drugs, 2) if p not in set(measured)]
        r = _rng(seed, "synergy_pairs")
        chosen = []
        for group in (measured, held_out):
            k = int(np.ceil(len(group) / 2))
            chosen += [group[i] for i in sorted(r.permutation(len(group))[:k].tolist())]
        synergy_pairs = chosen

    truth = SyntheticTruth(
        n_features, n_states, n_patients, n_drugs, synergy_pairs=synergy_pairs, noise_std=noise_std, seed=seed
    )

    combo_doses: list[list[float]] = []
    for cd in combination_doses:
        combo_doses.append([_check_dose_value(cd, "combination_doses")] if np.ndim(cd) == 0 else
                           [_check_dose_value(v, "combination_doses") for v in cd])
    if not combo_doses and combos:
        raise CellflowValueError("combination_doses must not be empty when combinations are requested.")

    # conditions: (condition, dose string, dose argument for truth, n cells)
    groups: list[tuple[str, str, Any, int]] = [(CONTROL, "0", None, n_control)]
    for k in truth.drugs:
        groups += [(k, format_dose(d), d, n_cells) for d in dose_values]
    for c in combos:
        for cd in combo_doses:
            per_member = cd * len(c) if len(cd) == 1 else cd
            if len(per_member) != len(c) or any(v <= 0 for v in per_member):
                raise CellflowValueError(
                    f"combination_doses entry {cd!r} must be one positive dose or one per member of "
                    f"{_condition_name(c)!r} ({len(c)} members)."
                )
            dose_str = "+".join(format_dose(v) for v in per_member)
            groups.append((_condition_name(c), dose_str, dose_str, n_cells))

    xs, states, cond_col, dose_col, patient_col = [], [], [], [], []
    for p in truth.patients:
        for cond, dose_str, dose_arg, n in groups:
            rng = _rng(seed, "data", p, cond, dose_str)
            x, s = truth._draw_control(n, p, rng)
            if cond != CONTROL:
                x = x + truth.displacement(x, cond, dose_arg)
                x = x + rng.normal(0.0, truth.noise_std, size=x.shape)
            xs.append(x)
            states.append(s)
            cond_col += [cond] * n
            dose_col += [dose_str] * n
            patient_col += [p] * n

    X = np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, truth.n_features), np.float32)
    state_idx = np.concatenate(states) if states else np.zeros(0, int)
    conditions = [CONTROL, *truth.drugs, *(_condition_name(c) for c in combos)]
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(cond_col, categories=conditions),
            "dose": np.asarray(dose_col, dtype=object),
            "patient": pd.Categorical(patient_col, categories=list(truth.patients)),
            "state": pd.Categorical.from_codes(state_idx, categories=list(truth.states)),
        },
        index=pd.Index([f"cell{i}" for i in range(X.shape[0])]),
    )
    var = pd.DataFrame(index=pd.Index([f"f{j}" for j in range(truth.n_features)]))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["synthetic"] = {
        "seed": seed,
        "n_features": truth.n_features,
        "n_states": truth.n_states,
        "n_patients": truth.n_patients,
        "n_drugs": truth.n_drugs,
        "drugs": list(truth.drugs),
        "patients": list(truth.patients),
        "states": list(truth.states),
        "doses": np.asarray(dose_values, dtype=np.float64),
        "combinations": [_condition_name(c) for c in combos],
        "combination_doses": [
            "+".join(format_dose(v) for v in cd) for cd in combo_doses
        ],
        "synergy_pairs": ["+".join(p) for p in truth.synergy_pairs],
        "n_control": n_control,
        "n_cells": n_cells,
        "noise_std": float(truth.noise_std),
        "temperature": float(truth.temperature),
        "ec50": np.asarray([truth.ec50[k] for k in truth.drugs], dtype=np.float64),
        "hill_coefficient": np.asarray([truth.hill_coefficient[k] for k in truth.drugs], dtype=np.float64),
        "state_weights": truth.state_weights.astype(np.float64),
        "patient_offsets": truth.patient_offsets.astype(np.float64),
        "centres": truth.centres.astype(np.float64),
    }
    return adata, truth


# --------------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------------
def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES and len(suffixes) >= 2 and suffixes[-2] in (".csv", ".tsv"):
        return suffixes[-2]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUPPORTED_SUFFIXES:
        shown = "".join(path.suffixes) or "(none)"
        raise CellflowValueError(
            f"read: unsupported file suffix {shown!r} of path {str(path)!r}; supported suffixes: "
            f"{format_choices(SUPPORTED_SUFFIXES)} (.csv/.tsv may end in {', '.join(_COMPRESSION_SUFFIXES)})."
        )
    return ".parquet" if suffix == ".pq" else suffix


def _is_feature_dtype(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _frame_to_anndata(
    df: pd.DataFrame,
    obs_columns: Sequence[str] | None,
    *,
    auto_index: bool,
    path: Path,
    metadata_prefix: str | None = None,
) -> ad.AnnData:
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    if len(set(df.columns)) != len(df.columns):
        dup = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
        raise CellflowValueError(f"read: {str(path)!r} has duplicated column names {dup}.")
    if isinstance(obs_columns, str):
        obs_columns = [obs_columns]
    if obs_columns is not None:
        obs_columns = [str(c) for c in obs_columns]
    # index rule: the first column is the index if its header is empty/"Unnamed: 0"/"index"
    if auto_index and isinstance(df.index, pd.RangeIndex) and df.shape[1] > 0:
        first = df.columns[0]
        if (first == "" or first.startswith("Unnamed: 0") or first.lower() == "index") and (
            obs_columns is None or first not in obs_columns
        ):
            df = df.set_index(first)
            df.index.name = None

    if obs_columns is None:
        def is_metadata(column: str) -> bool:
            return bool(metadata_prefix) and column.startswith(metadata_prefix)

        feature_cols = [c for c in df.columns if _is_feature_dtype(df[c]) and not is_metadata(c)]
        obs_cols = [c for c in df.columns if c not in set(feature_cols)]
    else:
        missing = [c for c in obs_columns if c not in df.columns]
        if missing:
            raise CellflowKeyError(
                f"read: obs_columns {missing} not found in {str(path)!r}; available columns: "
                f"{format_choices(df.columns)}."
            )
        obs_cols = list(dict.fromkeys(obs_columns))
        feature_cols = [c for c in df.columns if c not in set(obs_cols)]
        bad = [c for c in feature_cols if not _is_feature_dtype(df[c])]
        if bad:
            raise CellflowValueError(
                f"read: feature columns {format_choices(bad)} of {str(path)!r} are not numeric; "
                f"list them in obs_columns or fix the file."
            )
    if not feature_cols:
        raise CellflowValueError(
            f"read: {str(path)!r} has no numeric feature columns (columns: {format_choices(df.columns)}); "
            f"obs_columns={obs_columns!r}."
        )
    X = df[feature_cols].to_numpy(dtype=np.float32)
    obs = df[obs_cols].copy()
    obs.index = pd.Index([str(i) for i in df.index])
    var = pd.DataFrame(index=pd.Index(feature_cols))
    return ad.AnnData(X=X, obs=obs, var=var)


def _npz_to_anndata(path: Path, obs_columns: Sequence[str] | None, features_key: str | None) -> ad.AnnData:
    """An ``.npz`` archive: one 2-d feature array plus 1-d per-row metadata arrays."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if features_key is None:
        matrices = [k for k, v in arrays.items() if v.ndim == 2 and np.issubdtype(v.dtype, np.number)]
        if len(matrices) != 1:
            raise CellflowValueError(
                f"read: {str(path)!r} holds {len(matrices)} 2-d numeric arrays {matrices}; pass features_key= to "
                f"name the features (arrays: {format_choices(arrays)})."
            )
        features_key = matrices[0]
    if features_key not in arrays:
        raise CellflowKeyError(f"read: features_key={features_key!r} is not in {str(path)!r}; valid choices: {format_choices(arrays)}.")
    features = arrays.pop(features_key)
    if features.ndim != 2:
        raise CellflowValueError(f"read: {features_key!r} of {str(path)!r} must be 2-d (rows x features), got shape {features.shape}.")
    n, d = features.shape
    var_names = next((arrays.pop(k) for k in ("var_names", "feature_names") if k in arrays and arrays[k].shape == (d,)), None)
    obs_names = next((arrays.pop(k) for k in ("obs_names", "index") if k in arrays and arrays[k].shape == (n,)), None)
    wanted = list(arrays) if obs_columns is None else [str(c) for c in ([obs_columns] if isinstance(obs_columns, str) else obs_columns)]
    missing = [c for c in wanted if c not in arrays]
    if missing:
        raise CellflowKeyError(f"read: obs_columns {missing} not found in {str(path)!r}; valid choices: {format_choices(arrays)}.")
    misshapen = {c: arrays[c].shape for c in wanted if arrays[c].shape != (n,)}
    if misshapen:
        if obs_columns is not None:
            raise CellflowValueError(
                f"read: obs_columns of {str(path)!r} must be 1-d arrays of length {n} (one per row); got shapes {misshapen}."
            )
        warnings.warn(
            f"read: arrays {sorted(misshapen)} of {str(path)!r} are not per-row metadata (shapes {misshapen}) and are skipped.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        wanted = [c for c in wanted if c not in misshapen]
    index = pd.Index([str(v) for v in obs_names] if obs_names is not None else [str(i) for i in range(n)])
    obs = pd.DataFrame({c: arrays[c] for c in wanted}, index=index)
    var = pd.DataFrame(index=pd.Index([str(v) for v in var_names] if var_names is not None else [f"feature_{j}" for j in range(d)]))
    return ad.AnnData(X=np.asarray(features, dtype=np.float32), obs=obs, var=var)


def read(
    path: str | PathLike[str],
    *,
    obs_columns: Sequence[str] | None = None,
    metadata_prefix: str | None = "Metadata_",
    obsm_key: str | None = None,
    features_key: str | None = None,
    **kwargs: Any,
) -> ad.AnnData:
    """Read cells or profiles from ``.h5ad``, ``.csv``, ``.tsv``, ``.parquet`` or ``.npz`` into an AnnData.

    Parameters
    ----------
    path
        File path. The format comes from the suffix (case-insensitive): ``.h5ad``
        (:func:`anndata.read_h5ad`), ``.csv`` / ``.tsv`` (:func:`pandas.read_csv`; may end in
        ``.gz``, ``.bz2``, ``.zip``, ``.xz``, ``.zst``), ``.parquet`` / ``.pq``
        (:func:`pandas.read_parquet`, needs pyarrow), ``.npz`` (:func:`numpy.load`, no pickles).
    obs_columns
        Table formats only. ``None``: numeric (int/float, not bool) columns become the features in
        ``X`` and all other columns become ``obs``. Otherwise exactly these columns become ``obs``
        and every other column is a feature (all must be numeric); use this when a numeric column,
        e.g. a dose, is metadata. For ``.npz``: the 1-d arrays to keep as ``obs`` (default all).
    metadata_prefix
        Tables with ``obs_columns=None``: columns whose name starts with this go to ``obs`` even
        when numeric (CellProfiler and pycytominer name metadata ``Metadata_*``, e.g.
        ``Metadata_Concentration``). ``None`` turns the rule off.
    obsm_key
        Store the features in ``obsm[obsm_key]`` (as an embedding, ``rep=obsm_key``) instead of
        ``X``, which is then empty. For per-cell embeddings of an image encoder.
    features_key
        ``.npz`` only: the name of the 2-d feature array; by default the only 2-d numeric array.
        1-d arrays with one entry per row become ``obs`` columns; ``var_names`` /
        ``feature_names`` (one per feature) and ``obs_names`` / ``index`` (one per row) name
        the features and rows.
    **kwargs
        Passed to the underlying reader.

    Returns
    -------
    anndata.AnnData
        For tables: ``X`` float32 of shape ``(n_rows, n_feature_columns)``, ``var_names`` the feature
        column names (str), ``obs`` the metadata columns with their pandas dtypes, ``obs_names``
        the index as str.

    Notes
    -----
    Index rule for tables: if the table's first column has an empty header, a pandas
    ``"Unnamed: 0"`` header or the header ``"index"`` (case-insensitive) -- what
    :meth:`pandas.DataFrame.to_csv` / ``reset_index`` write -- and it is not listed in
    ``obs_columns``, it becomes ``obs_names``; parquet files that stored a pandas index get it
    back. Otherwise ``obs_names`` are ``"0", "1", ...``. Passing ``index_col`` in ``kwargs``
    disables the rule. Feature values are not checked for NaN here.

    Raises
    ------
    CellflowValueError
        Unsupported suffix (the message names it and the supported ones); non-numeric feature
        columns; no feature columns; ``obs_columns`` with ``.h5ad``.
    CellflowKeyError
        ``obs_columns`` naming a missing column.
    FileNotFoundError
        ``path`` does not exist.
    """
    path = Path(path)
    fmt = _format_of(path)
    if not path.exists():
        raise FileNotFoundError(f"read: no such file: {str(path)!r}")
    if fmt == ".h5ad":
        if obs_columns is not None or obsm_key is not None or features_key is not None:
            raise CellflowValueError(
                f"read: obs_columns, obsm_key and features_key apply to .csv/.tsv/.parquet/.npz tables only, "
                f"not to {str(path)!r}."
            )
        return ad.read_h5ad(path, **kwargs)
    if features_key is not None and fmt != ".npz":
        raise CellflowValueError(f"read: features_key={features_key!r} applies to .npz archives only, not to {str(path)!r}.")
    if fmt == ".npz":
        adata = _npz_to_anndata(path, obs_columns, features_key)
    else:
        if fmt in (".csv", ".tsv"):
            auto_index = "index_col" not in kwargs
            kwargs.setdefault("sep", "," if fmt == ".csv" else "\t")
            df = pd.read_csv(path, **kwargs)
        else:
            auto_index = True
            df = pd.read_parquet(path, **kwargs)
        adata = _frame_to_anndata(df, obs_columns, auto_index=auto_index, path=path, metadata_prefix=metadata_prefix)
    if obsm_key is None:
        return adata
    embedded = ad.AnnData(X=np.zeros((adata.n_obs, 0), dtype=np.float32), obs=adata.obs)
    embedded.obsm[obsm_key] = np.asarray(adata.X)
    embedded.uns["feature_names"] = [str(v) for v in adata.var_names]
    return embedded


def read_embeddings(path: str | PathLike[str], *, name_column: str | None = None) -> pd.DataFrame:
    """Read a table of perturbation embeddings: one row per perturbation, one column per dimension.

    The result is what ``ResponseModel(perturbation_embeddings=...)`` takes; rows beyond the
    training data make those perturbations predictable (see :func:`cellflow.data.embedding_neighbours`
    for the baselines). Gene embeddings of a foundation model, drug fingerprints written by
    :func:`cellflow.data.morgan_fingerprints`, or any descriptor table will do.

    Parameters
    ----------
    path
        ``.csv`` / ``.tsv`` (optionally compressed), ``.parquet``, ``.h5ad`` or ``.npz``, read by
        :func:`read`: numeric columns are the vector, the names come from ``name_column``, else
        from the only non-numeric column, else from the table's index (``obs_names``).
    name_column
        The column holding the perturbation names (needed when several columns are not numeric;
        the others, e.g. SMILES or annotations, are then ignored).

    Returns
    -------
    pandas.DataFrame
        Indexed by perturbation name (str), float32 columns.

    Raises
    ------
    CellflowKeyError
        ``name_column`` is not a column of the table.
    CellflowValueError
        No column or index holds names, or several non-numeric columns could (pass ``name_column``);
        duplicated names; and whatever :func:`read` raises.
    """
    table = read(path, metadata_prefix=None)
    text_columns = list(table.obs.columns)
    if name_column is not None:
        columns = text_columns + [str(c) for c in table.var_names]
        if name_column not in columns:
            raise CellflowKeyError(
                f"read_embeddings: name_column={name_column!r} is not a column of {str(path)!r}; "
                f"valid choices: {format_choices(columns)}."
            )
        if name_column not in text_columns:
            # numeric names (e.g. gene IDs) were read as a dimension: read again with them as metadata
            table = read(path, obs_columns=[name_column], metadata_prefix=None)
        names = table.obs[name_column].astype(str).to_numpy()
    elif len(text_columns) == 1:
        names = table.obs[text_columns[0]].astype(str).to_numpy()
    elif len(text_columns) > 1:
        raise CellflowValueError(
            f"read_embeddings: {str(path)!r} has several non-numeric columns {format_choices(text_columns)}; "
            f"pass name_column=<the one holding the perturbation names>."
        )
    elif isinstance(table.obs_names, pd.RangeIndex) or list(table.obs_names) == [str(i) for i in range(table.n_obs)]:
        raise CellflowValueError(
            f"read_embeddings: {str(path)!r} has no column of perturbation names (every column is numeric and the "
            f"rows are unnamed); add one, e.g. a first column 'perturbation'."
        )
    else:
        names = np.asarray(table.obs_names, dtype=str)
    index = pd.Index(names)
    duplicated = sorted(index[index.duplicated()].unique())
    if duplicated:
        raise CellflowValueError(f"read_embeddings: {str(path)!r} names {format_choices(duplicated)} more than once.")
    vectors = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float32)
    return pd.DataFrame(vectors, index=index.rename("perturbation"), columns=[str(c) for c in table.var_names])


def time_course(
    n_cells: int = 500,
    n_features: int = 8,
    times: Sequence[float] = (0.0, 1.0, 2.0),
    *,
    angle: float = np.pi,
    radius: float = 4.0,
    noise: float = 0.3,
    seed: int = 0,
) -> ad.AnnData:
    """A time course with a known, curved path: cells rotate about a centre while diffusing.

    At time ``t`` (of ``times``; the first is the controls') a cell is
    ``c + R(angle * u) (x0 - c) + noise * W_u`` with ``u = (t - t_0) / (t_last - t_0)``,
    ``x0 ~ N(0, I)`` shifted by ``radius`` from the centre ``c`` along the first axis, ``R`` the
    rotation in the plane of the first two features and ``W`` a Brownian motion. With the
    default half turn the mean travels along a semicircle, so the straight-line (displacement)
    interpolation of the end populations misses every intermediate snapshot. Every snapshot is
    an independent draw, as in a destructive measurement.

    Parameters
    ----------
    n_cells
        Cells per snapshot.
    n_features
        Dimension (>= 2).
    times
        Increasing measurement times; the first snapshot holds the controls.
    angle
        Total rotation over the time course, in radians.
    radius
        Distance of the control population's mean from the centre of rotation.
    noise
        Brownian noise per unit of the rescaled time ``u``.
    seed
        Seed.

    Returns
    -------
    AnnData with ``obsm["X_pca"]`` (and ``X``), ``obs["condition"]`` (``"control"`` for the first
    snapshot, ``"drug"`` after) and ``obs["time"]`` (float).
    """
    n_cells = _check_positive_int(n_cells, "n_cells")
    n_features = _check_positive_int(n_features, "n_features")
    if n_features < 2:
        raise CellflowValueError(f"n_features={n_features} must be >= 2 (the rotation acts on the first two features).")
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or len(times) < 2 or (np.diff(times) <= 0).any():
        raise CellflowValueError(f"times={times.tolist()} must be at least two increasing numbers.")
    rng = _rng(_check_seed(seed), "time_course")
    centre = np.zeros(n_features)
    blocks, labels, stamps = [], [], []
    for i, t in enumerate(times):
        u = (t - times[0]) / (times[-1] - times[0])
        x0 = rng.normal(size=(n_cells, n_features))
        x0[:, 0] += radius
        cos, sin = np.cos(angle * u), np.sin(angle * u)
        x = x0.copy()
        x[:, 0], x[:, 1] = cos * x0[:, 0] - sin * x0[:, 1], sin * x0[:, 0] + cos * x0[:, 1]
        x = centre + x + noise * np.sqrt(u) * rng.normal(size=x.shape)
        blocks.append(x)
        labels += [CONTROL if i == 0 else "drug"] * n_cells
        stamps += [float(t)] * n_cells
    cells = np.vstack(blocks).astype(np.float32)
    obs = pd.DataFrame({"condition": pd.Categorical(labels), "time": stamps}, index=[f"cell{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=cells, obs=obs)
    adata.obsm["X_pca"] = cells.copy()
    return adata


def __dir__() -> list[str]:
    # tab completion lists the public names, not this module's imports
    return sorted(__all__)
