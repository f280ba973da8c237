"""cellflow: generative models of cellular responses to perturbations, in JAX."""

__version__ = "0.1.0"
