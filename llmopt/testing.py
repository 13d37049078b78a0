"""Helpers for testing compression methods: toy models and checks every method must pass."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.measure import sqnr

__all__ = ["sqnr", "ToyMLP", "ToyAttentionBlock", "ToyTransformer", "CustomLinear", "word_tokenizer"]


class CustomLinear(nn.Linear):
    """A user's own ``nn.Linear`` subclass (extra attribute, same maths): wrappers must accept it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "custom"


class ToyMLP(nn.Module):
    """Two-layer MLP with widths that group sizes 32/64/128 do not all divide (96, 200)."""

    def __init__(self, d_in: int = 96, d_hidden: int = 208, d_out: int = 64, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=bias)
        self.down = CustomLinear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ToyAttentionBlock(nn.Module):
    """Pre-norm transformer block with grouped-query attention and a gated MLP (Llama-like)."""

    def __init__(self, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 176):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.attn_norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ToyTransformer(nn.Module):
    """Tiny causal LM: embedding, a ``ModuleList`` of blocks, norm, tied head. No library knows it."""

    def __init__(self, vocab: int = 128, dim: int = 64, n_layers: int = 2, tie: bool = True, **block_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ToyAttentionBlock(dim, **block_kwargs) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def word_tokenizer(words: Iterable[str]):
    """A Hugging Face fast tokenizer built offline (no hub): one id per word (split on whitespace),
    ``[UNK]``/``[BOS]``/``[EOS]`` first. Needs ``transformers`` (and its ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
