"""Array-level methods: pure functions over PyTrees, no AnnData."""

from cellflow.solvers import (
    baselines,
    diffusion,
    flow_matching,
    gaussian,
    interpolation,
    neural_ot,
    schrodinger_bridge,
    subspace,
)

__all__ = ["baselines", "diffusion", "flow_matching", "gaussian", "interpolation", "neural_ot", "schrodinger_bridge", "subspace"]
