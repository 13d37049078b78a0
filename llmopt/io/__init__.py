"""Files: llmopt's own format (safetensors + JSON, never pickle), the Hugging Face round trip, LoRA adapters,
compressed-tensors export and compressed-tensors / GPTQ checkpoint import, GGUF export for llama.cpp."""

from ..nn.base import register_module_type  # where wrappers register for load (kept here for old imports)
from .adapters import load_adapters, save_adapters
from .compressed_tensors import (ExportError, export_compressed_tensors, load_compressed_tensors, load_gptq,
                                 load_quantized)
from .gguf import GGUFExportError, GGUFExportReport, export_gguf, gguf_scheme
from .hf import load_pretrained, save_pretrained
from ..core.files import LoadError
from .save import MANIFEST_NAME, TENSORS_NAME, load, read_manifest, save, tensor_files

__all__ = ["save", "load", "save_pretrained", "load_pretrained", "save_adapters", "load_adapters", "read_manifest",
           "tensor_files", "register_module_type", "LoadError", "MANIFEST_NAME", "TENSORS_NAME",
           "export_compressed_tensors", "load_compressed_tensors", "load_gptq", "load_quantized", "ExportError",
           "export_gguf", "gguf_scheme", "GGUFExportReport", "GGUFExportError"]
