"""Molecular fingerprints as perturbation embeddings, so that unseen drugs can be predicted.

RDKit is an optional dependency (``pip install "cellflow-jax[chem]"``); it is imported only
when a fingerprint is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from cellflow._errors import CellflowValueError, format_choices

__all__ = ["morgan_fingerprints"]


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "morgan_fingerprints needs RDKit, an optional dependency: pip install 'cellflow-jax[chem]' (or pip install rdkit)."
        ) from err
    return Chem, RDLogger, rdFingerprintGenerator


def morgan_fingerprints(
    smiles: Mapping[str, str] | pd.Series,
    *,
    radius: int = 2,
    n_bits: int = 1024,
    counts: bool = False,
    include_chirality: bool = False,
) -> pd.DataFrame:
    """Morgan (ECFP-like) fingerprints of molecules given as SMILES, one row per perturbation.

    The result plugs straight into ``ResponseModel(..., perturbation_embeddings=...)``: drugs
    that share substructures get similar vectors, so a drug never seen in training but with a
    fingerprint can be predicted (CellFlow's ``ecfp`` drug representation; ECFP4 is radius 2).

    Parameters
    ----------
    smiles
        ``{perturbation name: SMILES}`` (a dict or a :class:`pandas.Series` indexed by name).
    radius
        Morgan radius; 2 gives ECFP4-like features.
    n_bits
        Length of the folded fingerprint.
    counts
        Count fingerprint (how often each substructure occurs) instead of bits.
    include_chirality
        Distinguish stereoisomers.

    Returns
    -------
    pandas.DataFrame
        Shape ``(n_perturbations, n_bits)``, float32, indexed by perturbation name, columns
        ``morgan_0 ... morgan_{n_bits-1}``.

    Raises
    ------
    ImportError
        RDKit is not installed (the message says how to install it).
    CellflowValueError
        Unparsable SMILES (the message names the perturbations), empty input, bad sizes.

    Examples
    --------
    >>> fps = cf.data.morgan_fingerprints({"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C"})
    >>> model = cf.ResponseModel(adata, perturbation_embeddings=fps, ...)
    """
    items = dict(smiles.items()) if isinstance(smiles, pd.Series) else dict(smiles)
    if not items:
        raise CellflowValueError("smiles is empty; give {perturbation name: SMILES}.")
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
        raise CellflowValueError(f"radius must be a non-negative integer, got {radius!r}.")
    if isinstance(n_bits, bool) or not isinstance(n_bits, int | np.integer) or n_bits < 1:
        raise CellflowValueError(f"n_bits must be a positive integer, got {n_bits!r}.")
    Chem, RDLogger, rdFingerprintGenerator = _rdkit()
    generator = rdFingerprintGenerator.GetMorganGenerator(
        radius=int(radius), fpSize=int(n_bits), includeChirality=include_chirality
    )
    rows, bad = [], []
    RDLogger.DisableLog("rdApp.*")  # parse errors are reported once, below, by name
    try:
        for name, text in items.items():
            molecule = Chem.MolFromSmiles(text) if isinstance(text, str) and text else None
            if molecule is None:
                bad.append(str(name))
                continue
            fingerprint = generator.GetCountFingerprintAsNumPy(molecule) if counts else generator.GetFingerprintAsNumPy(molecule)
            rows.append(np.asarray(fingerprint, dtype=np.float32))
    finally:
        RDLogger.EnableLog("rdApp.*")
    if bad:
        raise CellflowValueError(f"RDKit could not parse the SMILES of {len(bad)} perturbation(s): {format_choices(bad)}.")
    return pd.DataFrame(
        np.stack(rows), index=pd.Index([str(n) for n in items]), columns=[f"morgan_{j}" for j in range(int(n_bits))]
    )
