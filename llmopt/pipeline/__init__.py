"""Whole-model entry points: ``compress_`` (every method, one protocol), recipes, mixed precision by
budget, reports, the LoRA merge verbs, and the deprecated verbs ``compress_`` replaced."""
