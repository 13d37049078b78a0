"""Quantization: number formats, pure maths, packing and methods."""

from .formats import WeightFormat, get_format, list_formats, register_format
from .primitives import dequantize_weight, fake_quantize, quantize_weight

__all__ = ["WeightFormat", "get_format", "list_formats", "register_format", "quantize_weight",
           "dequantize_weight", "fake_quantize"]
