"""cellflow: generative models of cellular responses to perturbations, in JAX.

>>> import cellflow as cf
>>> model = cf.ResponseModel(adata, rep="X_pca", perturbation_key="condition", control="control",
...                          method="mean_shift").fit()
>>> pred = model.predict(adata[adata.obs.condition == "control"], perturbation="A+B")
>>> cf.metrics.evaluate(pred, truth, rep="X_pca", groupby="condition")
"""

__version__ = "0.1.0"

from cellflow import data, datasets, methods, metrics, nn, pl, pp, solvers, train  # noqa: E402
from cellflow._errors import CellflowKeyError, CellflowValueError  # noqa: E402
from cellflow.model import ResponseModel  # noqa: E402

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
