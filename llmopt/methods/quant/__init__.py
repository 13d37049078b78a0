"""Quantization methods: RTN, HQQ, GPTQ, AWQ, SmoothQuant, quantization-aware training (QAT), LearnedRound
(block-wise learned rounding and clipping), and Rotate
(orthogonal rotations folded into the weights before a quantizer)."""

from .awq import AWQ
from .gptq import GPTQ
from .hqq import HQQ
from .learned_round import LearnedRound
from .qat import QAT
from .rotate import Rotate
from .rtn import RTN
from .smoothquant import SmoothQuant

__all__ = ["RTN", "HQQ", "GPTQ", "AWQ", "SmoothQuant", "QAT", "Rotate", "LearnedRound"]
