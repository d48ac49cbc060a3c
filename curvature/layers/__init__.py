"""Layer knowledge: shapes and index conventions per layer type."""

from .base import LayerHandler, append_ones
from .conv2d import Conv2dHandler, unfold_reference
from .linear import LinearHandler
from .registry import Layer, find_layers, handler_for, register_handler

__all__ = [
    "Conv2dHandler",
    "Layer",
    "LayerHandler",
    "LinearHandler",
    "append_ones",
    "find_layers",
    "handler_for",
    "register_handler",
    "unfold_reference",
]
