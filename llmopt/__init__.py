"""llmopt: composable compression primitives for PyTorch models.

Public surface: one entry point, :func:`compress_`, for every technique, each a method config:
quantization (:class:`RTN`, :class:`HQQ`, :class:`GPTQ`, :class:`AWQ`, :class:`SmoothQuant`,
:class:`QAT`), low rank (:class:`SVD`, :class:`QuantLowRank`, :class:`LoRA` adapters), pruning
(:class:`Magnitude`, :class:`Wanda`, :class:`SparseGPT`, :class:`PruneChannels`, :class:`PruneHeads`),
applied alone, in a list or in a :class:`Recipe`. Around it: :func:`save` / :func:`load`,
:func:`save_pretrained` / :func:`load_pretrained`, :func:`export_gguf` (llama.cpp), :func:`export_compressed_tensors` /
:func:`load_quantized` (compressed-tensors and GPTQ checkpoints), :func:`memory_report`, :func:`allocate`, the LoRA
verbs that are not compressions (:func:`merge_lora_`, :func:`unmerge_lora_`, :func:`save_adapters`,
:func:`load_adapters`), the extension points (:class:`MethodConfig` / :func:`register_method`,
:class:`WeightFormat` / :func:`register_format`, :func:`register_kernel`), the quantization scheme
:class:`WeightQuant`, and the :mod:`llmopt.nn` wrappers. Everything else
lives in the subpackages (``llmopt.methods``, ``llmopt.pipeline``, ``llmopt.core``, ...).
"""

import warnings
from typing import Any, Dict, Tuple

from . import _compat
from ._version import __version__

_compat.install()

from . import nn  # noqa: E402  (registers wrapper types for save/load)
from .core import measure as _measure  # noqa: E402
from .core.errors import CompressionError  # noqa: E402
from .core.formats import WeightFormat, get_format, list_formats, register_format  # noqa: E402
from .core.measure import memory_report  # noqa: E402
from .core.scheme import WeightQuant  # noqa: E402
from .io.adapters import load_adapters, save_adapters  # noqa: E402
from .io.compressed_tensors import export_compressed_tensors, load_quantized  # noqa: E402
from .io.gguf import export_gguf  # noqa: E402
from .io.hf import load_pretrained, save_pretrained  # noqa: E402
from .io.save import load, save  # noqa: E402
from .kernels import list_kernels, register_kernel  # noqa: E402
from .methods.base import MethodConfig, list_methods, register_method  # noqa: E402
from .methods.lowrank import compensation as _compensation  # noqa: E402
from .methods.lowrank import svd as _svd  # noqa: E402
from .methods.lowrank.compensation import QuantLowRank  # noqa: E402
from .methods.lowrank.lora import LoRA  # noqa: E402
from .methods.lowrank.svd import SVD  # noqa: E402
from .methods.prune import magnitude as _magnitude  # noqa: E402
from .methods.prune import schedule as _schedule  # noqa: E402
from .methods.prune.magnitude import Magnitude  # noqa: E402
from .methods.prune.sparsegpt import SparseGPT  # noqa: E402
from .methods.prune.structured import PruneChannels, PruneHeads  # noqa: E402
from .methods.prune.wanda import Wanda  # noqa: E402
from .methods.quant.awq import AWQ  # noqa: E402
from .methods.quant.learned_round import LearnedRound  # noqa: E402
from .methods.quant.gptq import GPTQ  # noqa: E402
from .methods.quant.hqq import HQQ  # noqa: E402
from .methods.quant.qat import QAT  # noqa: E402
from .methods.quant.rotate import Rotate  # noqa: E402
from .methods.quant.rtn import RTN  # noqa: E402
from .methods.quant.smoothquant import SmoothQuant  # noqa: E402
from .nn import qat_linear as _qat_linear  # noqa: E402
from .pipeline import deprecated as _deprecated  # noqa: E402
from .pipeline.allocate import Allocation, allocate  # noqa: E402
from .pipeline.api import compress_  # noqa: E402
from .pipeline.lora import merge_lora_, unmerge_lora_  # noqa: E402
from .pipeline.recipe import Recipe, Stage, list_presets  # noqa: E402
from .pipeline.report import CompressionReport  # noqa: E402

__all__ = [
    "__version__", "compress_", "CompressionReport", "CompressionError", "save", "load",
    "save_pretrained", "load_pretrained", "export_gguf", "export_compressed_tensors", "load_quantized", "Recipe", "Stage",
    "list_presets",
    "MethodConfig", "register_method", "list_methods",
    "RTN", "HQQ", "GPTQ", "AWQ", "SmoothQuant", "QAT", "Rotate", "LearnedRound", "SVD", "QuantLowRank", "LoRA",
    "Magnitude", "Wanda", "SparseGPT", "PruneChannels", "PruneHeads",
    "merge_lora_", "unmerge_lora_", "save_adapters", "load_adapters",
    "memory_report", "allocate", "Allocation",
    "WeightFormat", "register_format", "get_format", "list_formats", "WeightQuant",
    "register_kernel", "list_kernels", "nn",
]

# Names the top level exported before every technique became a method of compress_: they keep
# working for one release, with a DeprecationWarning saying what to use instead.
# name -> (module that holds it now, attribute there, the new way)
_MOVED: Dict[str, Tuple[Any, str, str]] = {
    "add_lora_": (_deprecated, "add_lora_", "llmopt.compress_(model, llmopt.LoRA(...), include=[...])"),
    "prepare_qat_": (_deprecated, "prepare_qat_", "llmopt.compress_(model, llmopt.QAT(format, group_size))"),
    "convert_qat_": (_deprecated, "convert_qat_", "llmopt.compress_(model, llmopt.QAT(step='convert'))"),
    "prune_channels_": (_deprecated, "prune_channels_", "llmopt.compress_(model, llmopt.PruneChannels(ratio))"),
    "prune_heads_": (_deprecated, "prune_heads_", "llmopt.compress_(model, llmopt.PruneHeads(ratio))"),
    "plan_ranks": (_svd, "plan_ranks", "llmopt.methods.lowrank.plan_ranks"),
    "GradualPruner": (_schedule, "GradualPruner", "llmopt.methods.prune.GradualPruner"),
    "cubic_sparsity": (_schedule, "cubic_sparsity", "llmopt.methods.prune.cubic_sparsity"),
    "plan_global_sparsity": (_magnitude, "plan_global_sparsity", "llmopt.methods.prune.plan_global_sparsity"),
    "trainable_parameters": (_measure, "trainable_parameters", "llmopt.core.measure.trainable_parameters"),
    "compensation_to_lora_": (_compensation, "compensation_to_lora_",
                              "llmopt.methods.lowrank.compensation_to_lora_"),
    "QATLinear": (_qat_linear, "QATLinear", "llmopt.nn.QATLinear"),
    "sqnr": (_measure, "sqnr", "llmopt.core.measure.sqnr"),
}


def __getattr__(name: str) -> Any:
    """The old top-level names (see ``_MOVED``), with a ``DeprecationWarning``."""
    if name in _MOVED:
        module, attr, new = _MOVED[name]
        warnings.warn(f"llmopt.{name} is deprecated and will be removed in the next release; use {new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(module, attr)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
