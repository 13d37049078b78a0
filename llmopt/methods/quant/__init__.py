"""Quantization methods: RTN, HQQ, GPTQ, AWQ, SmoothQuant and quantization-aware training."""

from .awq import AWQ
from .gptq import GPTQ
from .hqq import HQQ
from .qat import convert_qat_, prepare_qat_
from .rtn import RTN
from .smoothquant import SmoothQuant

__all__ = ["RTN", "HQQ", "GPTQ", "AWQ", "SmoothQuant", "prepare_qat_", "convert_qat_"]
