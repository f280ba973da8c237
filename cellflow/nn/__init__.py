"""flax nnx modules: time embeddings, residual blocks, condition/population encoders, velocity fields."""

from cellflow.nn.bridge import BridgeField
from cellflow.nn.denoiser import Denoiser
from cellflow.nn.layers import MLP, ResidualBlock, dropout, sinusoidal_time_embedding
from cellflow.nn.response import FIELDS, Encoded, ResponseField, dose_features

__all__ = ["FIELDS", "MLP", "BridgeField", "Denoiser", "Encoded", "ResidualBlock", "ResponseField", "dose_features", "dropout", "sinusoidal_time_embedding"]
