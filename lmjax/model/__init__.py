"""The Flax NNX decoder-only Transformer."""

from lmjax.model.config import ModelConfig
from lmjax.model.transformer import Block, Transformer, count_params, logical_axes

__all__ = ["Block", "ModelConfig", "Transformer", "count_params", "logical_axes"]
