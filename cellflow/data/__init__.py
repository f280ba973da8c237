"""AnnData -> arrays: representations, conditions, embeddings, a jittable sampler and splits."""

from cellflow.data._representation import available_representations, check_finite, get_representation

__all__ = ["available_representations", "check_finite", "get_representation"]
