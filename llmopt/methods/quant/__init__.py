"""Quantization methods: RTN, HQQ, GPTQ, AWQ, SmoothQuant and quantization-aware training (QAT)."""

from .awq import AWQ
from .gptq import GPTQ
from .hqq import HQQ
from .qat import QAT
from .rtn import RTN
from .smoothquant import SmoothQuant

__all__ = ["RTN", "HQQ", "GPTQ", "AWQ", "SmoothQuant", "QAT"]
