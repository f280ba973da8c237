"""cellflow: generative models of cellular responses to perturbations, in JAX.

>>> import cellflow as cf
>>> model = cf.ResponseModel(adata, rep="X_pca", perturbation_key="condition", control="control",
...                          method="mean_shift").fit()
>>> pred = model.predict(adata[adata.obs.condition == "control"], perturbation="A+B")
>>> cf.metrics.evaluate(pred, truth, rep="X_pca", groupby="condition")
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

from cellflow._errors import CellflowKeyError, CellflowValueError

if TYPE_CHECKING:
    from cellflow import data, datasets, methods, metrics, nn, pl, pp, solvers, train
    from cellflow.model import ResponseModel

# Submodules load on first use (PEP 562): JAX, ott-jax and anndata take seconds to import, which
# ``cellflow --help``, a mistyped command line or a script that only reads a file need not pay.
_SUBMODULES = ("data", "datasets", "methods", "metrics", "nn", "pl", "pp", "solvers", "train")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"cellflow.{name}")
    if name == "ResponseModel":
        return importlib.import_module("cellflow.model").ResponseModel
    raise AttributeError(f"module 'cellflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the public names (submodules included, loaded or not), not this module's imports
    return sorted(__all__)

__all__ = [
    "CellflowKeyError",
    "CellflowValueError",
    "ResponseModel",
    "data",
    "datasets",
    "methods",
    "metrics",
    "nn",
    "pl",
    "train",
    "pp",
    "solvers",
    "__version__",
]
