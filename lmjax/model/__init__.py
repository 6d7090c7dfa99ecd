"""The Flax NNX decoder-only Transformer."""

from lmjax.model.transformer import Block, Transformer, count_params, logical_axes

__all__ = ["Block", "Transformer", "count_params", "logical_axes"]
