"""llmopt: composable compression primitives for PyTorch models.

Public surface: :func:`compress_`, :func:`save`, :func:`load`, :func:`memory_report`, the method
configs (:class:`RTN`, :class:`GPTQ`, :class:`AWQ`, :class:`Wanda`, :class:`SVD`, ...), :mod:`llmopt.nn` wrappers, :func:`register_format` / :class:`WeightFormat`,
:func:`register_method`.
"""

from . import _compat
from ._version import __version__

_compat.install()

from . import nn  # noqa: E402  (registers wrapper types for save/load)
from .core.errors import CompressionError  # noqa: E402
from .core.formats import WeightFormat, get_format, list_formats, register_format  # noqa: E402
from .core.measure import memory_report, sqnr  # noqa: E402
from .io.adapters import load_adapters, save_adapters
from .io.hf import load_pretrained, save_pretrained  # noqa: E402
from .io.save import load, save  # noqa: E402
from .methods.base import (  # noqa: E402
    MethodConfig,  # noqa: E402
    list_methods,
    register_method,
)
from .methods.lowrank.compensation import QuantLowRank, compensation_to_lora_  # noqa: E402
from .methods.lowrank.lora import LoRA, add_lora_, merge_lora_, trainable_parameters, unmerge_lora_
from .methods.lowrank.svd import SVD, plan_ranks  # noqa: E402
from .methods.prune import (
    GradualPruner,
    Magnitude,
    SparseGPT,
    Wanda,
    cubic_sparsity,
    plan_global_sparsity,
    prune_channels_,
    prune_heads_,
)
from .methods.quant.awq import AWQ  # noqa: E402
from .methods.quant.gptq import GPTQ  # noqa: E402
from .methods.quant.hqq import HQQ  # noqa: E402
from .methods.quant.qat import convert_qat_, prepare_qat_
from .methods.quant.rtn import RTN  # noqa: E402
from .methods.quant.smoothquant import SmoothQuant  # noqa: E402
from .nn.qat_linear import QATLinear  # noqa: E402
from .pipeline.allocate import Allocation, allocate  # noqa: E402
from .pipeline.api import CompressionReport, compress_
from .pipeline.recipe import Recipe, Stage  # noqa: E402

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
