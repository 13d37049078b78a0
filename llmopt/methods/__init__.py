"""Compression methods, one file each: a :class:`~llmopt.methods.base.MethodConfig` plus its registered handler.

``quant/`` (RTN, HQQ, GPTQ, AWQ, SmoothQuant, QAT), ``lowrank/`` (SVD, LoRA, quantization + low-rank
compensation), ``prune/`` (magnitude, Wanda, SparseGPT, structured channels and heads, gradual
schedules). ``base`` holds the protocol every config follows and the registry.
"""
