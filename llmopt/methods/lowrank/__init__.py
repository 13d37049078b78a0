"""Low-rank methods: truncated SVD (plain and activation-aware) with rank planning, LoRA adapters, and
quantization with a low-rank correction."""

from .compensation import QuantLowRank, compensation_to_lora_
from .lora import LoRA, LoRAError, lora_layers, trainable_parameters
from .svd import SVD, allocate_ranks, plan_ranks, rank_from, saves_parameters

__all__ = [
    "SVD", "rank_from", "saves_parameters", "allocate_ranks", "plan_ranks", "LoRA", "LoRAError", "lora_layers",
    "trainable_parameters", "QuantLowRank", "compensation_to_lora_",
]
