"""Array-level methods: pure functions over PyTrees, no AnnData."""

from cellflow.solvers import baselines, gaussian, neural_ot

__all__ = ["baselines", "gaussian", "neural_ot"]
