"""Whole-model entry points: ``compress_``, recipes, mixed precision by budget, reports."""
