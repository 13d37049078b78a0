"""llmopt: composable compression primitives for PyTorch models.

Public surface: :func:`compress_`, :func:`save`, :func:`load`, :func:`memory_report`, the method
configs (:class:`RTN`, :class:`GPTQ`, :class:`AWQ`, :class:`Wanda`, :class:`SVD`, ...), :mod:`llmopt.nn` wrappers, :func:`register_format` / :class:`WeightFormat`,
:func:`register_method`.
"""

__version__ = "0.1.0"

from . import nn  # noqa: E402  (registers wrapper types for save/load)
from .analysis import memory_report, sqnr  # noqa: E402
from .api import CompressionError, CompressionReport, compress_  # noqa: E402
from .config import MethodConfig  # noqa: E402
from .io import load, save  # noqa: E402
from .hf import load_pretrained, save_pretrained  # noqa: E402
from .quant.formats import WeightFormat, get_format, list_formats, register_format  # noqa: E402
from .quant.rtn import RTN  # noqa: E402
from .quant.gptq import GPTQ  # noqa: E402
from .quant.hqq import HQQ  # noqa: E402
from .quant.awq import AWQ  # noqa: E402
from .quant.smoothquant import SmoothQuant  # noqa: E402
from .lowrank.svd import SVD, plan_ranks  # noqa: E402
from .lowrank.lora import (  # noqa: E402
    LoRA,
    add_lora_,
    load_adapters,
    merge_lora_,
    save_adapters,
    trainable_parameters,
    unmerge_lora_,
)
from .lowrank.compensation import QuantLowRank, compensation_to_lora_  # noqa: E402
from .quant.qat import QATLinear, convert_qat_, prepare_qat_  # noqa: E402
from .prune import (  # noqa: E402
    GradualPruner,
    Magnitude,
    SparseGPT,
    Wanda,
    cubic_sparsity,
    plan_global_sparsity,
    prune_channels_,
    prune_heads_,
)
from .registry import list_methods, register_method  # noqa: E402
from .recipe import Recipe, Stage  # noqa: E402
from .allocate import Allocation, allocate  # noqa: E402

__all__ = [
    "__version__", "compress_", "CompressionReport", "CompressionError", "save", "load",
    "save_pretrained", "load_pretrained",
    "memory_report", "sqnr", "MethodConfig", "RTN", "GPTQ", "HQQ", "AWQ", "SmoothQuant", "SVD", "plan_ranks",
    "LoRA", "add_lora_", "merge_lora_", "unmerge_lora_", "save_adapters", "load_adapters", "trainable_parameters",
    "QuantLowRank", "compensation_to_lora_", "QATLinear", "prepare_qat_", "convert_qat_",
    "Magnitude", "Wanda", "SparseGPT", "plan_global_sparsity", "GradualPruner", "cubic_sparsity",
    "prune_channels_", "prune_heads_",
    "register_method", "list_methods", "Recipe", "Stage",
    "allocate", "Allocation",
    "WeightFormat", "register_format", "get_format", "list_formats", "nn",
]
