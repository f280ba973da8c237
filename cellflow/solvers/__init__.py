"""Array-level methods: pure functions over PyTrees, no AnnData."""

from cellflow.solvers import baselines, gaussian

__all__ = ["baselines", "gaussian"]
