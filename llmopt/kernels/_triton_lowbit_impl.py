"""Triton kernels behind ``lowbit_triton`` (imported lazily: ``triton`` is an optional dependency).

Both kernels read the *canonical* packed weight (``qdata`` uint8 ``[N, ceil(K * bits / 8)]``, one
little-endian bit stream per row; see :mod:`llmopt.core.packing`) and decode it in registers, so the
layer keeps a single copy of the weight in its stored width:

* ``lowbit_gemv``: one program per ``BLOCK_N`` output columns and activation row, optionally split
  over K (``SPLIT_K`` programs add into a float32 buffer). For decode, ``M <= 16``: each weight tile
  is read from HBM once and served to the other rows from L2.
* ``lowbit_gemm``: tiled ``tl.dot`` in the activations' dtype (bf16/fp16 tensor cores) with a float32
  accumulator, for prefill and training.

Decoding a code: column ``k`` of a row starts at bit ``k * BITS`` of the row's stream. For 1/2/4/8
bits a code never straddles a byte; other widths (3) read a 16-bit window of two bytes. The value is

* affine (``KIND == 0``): ``(code - mid) * scale (+ zero_point)``;
* 16-level codebook (``KIND == 1``): ``lut[code] * scale``;
* fp8 e4m3 (``KIND == 2``): the float built from the code's sign/exponent/mantissa bits, times ``scale``.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (that is how CI checks them); the
interpreter's ``tl.dot`` is wrong for bfloat16 operands (triton 3.9), so ``DOT_F32`` makes the GEMM
multiply in float32 there.
"""

from __future__ import annotations

import triton
import triton.language as tl

AFFINE, LUT, FP8 = 0, 1, 2


@triton.jit
def _fp8_e4m3(code):
    """float32 value of e4m3 codes: sign | 4 exponent bits (bias 7) | 3 mantissa bits; subnormals are
    ``m * 2**-9``, normals ``(8 + m) * 2**(e - 10)`` (the power of two built from its bits: exact)."""
    e = (code >> 3) & 15
    m = code & 7
    normal = (8 + m).to(tl.float32) * ((e + 117) << 23).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((code & 128) != 0, -mag, mag)


@triton.jit
def _store_row(acc, b_ptr, y_row, rn, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write one output row's ``BLOCK_N`` columns: bias added and cast, or (split K) float32 partial
    sums added atomically (the caller adds the bias and casts)."""
    nmask = rn < N
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_row + rn, acc.to(y_row.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_row + rn, acc, mask=nmask)


@triton.jit
def _decode_tile(q_ptr, s_ptr, z_ptr, lut_ptr, rn, rk, N, K, row_bytes, n_groups, group_size, mid,
                 BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr,
                 GROUP_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 weight tile ``[len(rn), len(rk)]`` (zeros outside ``N x K``)."""
    nmask = rn < N
    kmask = rk < K
    mask = nmask[:, None] & kmask[None, :]
    row = rn.to(tl.int64)[:, None] * row_bytes
    bit = rk * BITS
    byte = bit // 8
    if BITS == 8:
        code = tl.load(q_ptr + row + rk[None, :], mask=mask, other=0).to(tl.int32)
    elif (8 % BITS) == 0:
        raw = tl.load(q_ptr + row + byte[None, :], mask=mask, other=0).to(tl.int32)
        code = (raw >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
    else:
        lo = tl.load(q_ptr + row + byte[None, :], mask=mask, other=0).to(tl.int32)
        hmask = mask & ((byte + 1) < row_bytes)[None, :]
        hi = tl.load(q_ptr + row + (byte + 1)[None, :], mask=hmask, other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)

    if GROUP_ALIGNED:
        # The whole K tile lies in one group: one scale (and zero point) per row.
        g = tl.min(rk, axis=0) // group_size
        scale = tl.load(s_ptr + rn.to(tl.int64) * n_groups + g, mask=nmask, other=0.0).to(tl.float32)
        scale = scale[:, None]
        if HAS_ZERO:
            zero = tl.load(z_ptr + rn.to(tl.int64) * n_groups + g, mask=nmask, other=0.0).to(tl.float32)
            zero = zero[:, None]
    else:
        gidx = rn.to(tl.int64)[:, None] * n_groups + (rk // group_size)[None, :]
        scale = tl.load(s_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + gidx, mask=mask, other=0.0).to(tl.float32)

    if KIND == 0:
        w = (code - mid).to(tl.float32) * scale
        if HAS_ZERO:
            w = w + zero
    elif KIND == 1:
        w = tl.load(lut_ptr + code) * scale
    else:
        w = _fp8_e4m3(code) * scale
    return tl.where(mask, w, 0.0)


@triton.jit
def lowbit_gemv(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                M, N, K, row_bytes, n_groups, group_size, mid, stride_xm, stride_ym, k_per_split,
                BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                GROUP_ALIGNED: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` for one row ``m`` and ``BLOCK_N`` columns."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * k_per_split
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = _decode_tile(q_ptr, s_ptr, z_ptr, lut_ptr, rn, rk, N, K, row_bytes, n_groups, group_size, mid,
                         BITS, KIND, HAS_ZERO, GROUP_ALIGNED, BLOCK_K)
        acc += tl.sum(w * x[None, :], axis=1)
    _store_row(acc, b_ptr, y_ptr + pid_m.to(tl.int64) * stride_ym, rn, N, HAS_BIAS, SPLIT_K)


@triton.jit
def lowbit_gemm(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                M, N, K, row_bytes, n_groups, group_size, mid, stride_xm, stride_ym,
                BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                GROUP_ALIGNED: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``BLOCK_M x BLOCK_N`` tile of ``y = x @ W.T (+ bias)`` with the weight decoded per K tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                    mask=mmask[:, None] & (rk < K)[None, :], other=0.0)
        w = _decode_tile(q_ptr, s_ptr, z_ptr, lut_ptr, rn, rk, N, K, row_bytes, n_groups, group_size, mid,
                         BITS, KIND, HAS_ZERO, GROUP_ALIGNED, BLOCK_K)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # float32 activations stay float32
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & (rn < N)[None, :])


@triton.jit
def lowbit_gemv_words(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                      N, K, words_per_row, n_groups, group_size, mid, stride_xm, stride_ym,
                      n_vgroups, vgroups_per_split,
                      BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, WPG: tl.constexpr,
                      CPW: tl.constexpr, VG: tl.constexpr, CODE_MASK: tl.constexpr):
    """The decode GEMV for 1/2/4/8-bit codes, reading the packed rows as 32-bit words.

    A row is cut into "virtual groups" of ``VG = WPG * 32 / BITS`` codes, each inside one real group
    (or the row is one group). Per tile of ``GROUPS`` virtual groups: one load per word, then for each
    of the word's ``32 / BITS`` codes a shift, mask, int->float and FMA with the matching activations
    (loaded with a stride of ``32 / BITS``); the scale (and zero point times the group's activation sum)
    is applied once per virtual group and row, not per weight.
    """
    # CPW = 32 // BITS codes per word, VG = WPG * CPW codes per virtual group, CODE_MASK = 2**BITS - 1:
    # derived by the launcher and passed as constants (portable across Triton versions).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rn64 = rn.to(tl.int64)
    rg = tl.arange(0, GROUPS)
    rw = tl.arange(0, WPG)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_k * vgroups_per_split
    v_stop = tl.minimum(v_start + vgroups_per_split, n_vgroups)
    for v0 in range(v_start, v_stop, GROUPS):
        v = v0 + rg
        vmask = v < v_stop
        widx = v[:, None] * WPG + rw[None, :]
        wmask = vmask[:, None] & (widx < words_per_row)
        words = tl.load(w_ptr + rn64[:, None, None] * words_per_row + widx[None, :, :],
                        mask=nmask[:, None, None] & wmask[None, :, :], other=0)
        kbase = v[:, None] * VG + rw[None, :] * CPW
        part = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        xsum = tl.zeros((GROUPS,), dtype=tl.float32)
        for j in tl.static_range(CPW):
            code = (words >> (j * BITS)) & CODE_MASK
            kk = kbase + j
            # Columns past K (the row's padding bits) meet zero activations.
            xj = tl.load(x_row + kk, mask=wmask & (kk < K), other=0.0).to(tl.float32)
            if KIND == 0:
                val = (code - mid).to(tl.float32)
            elif KIND == 1:
                val = tl.load(lut_ptr + code)
            else:
                val = _fp8_e4m3(code)
            part += tl.sum(val * xj[None, :, :], axis=2)
            if HAS_ZERO:
                xsum += tl.sum(xj, axis=1)
        gidx = (v * VG) // group_size
        pmask = nmask[:, None] & vmask[None, :]
        pidx = rn64[:, None] * n_groups + gidx[None, :]
        contrib = part * tl.load(s_ptr + pidx, mask=pmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            contrib += tl.load(z_ptr + pidx, mask=pmask, other=0.0).to(tl.float32) * xsum[None, :]
        acc += tl.sum(contrib, axis=1)
    _store_row(acc, b_ptr, y_ptr + pid_m.to(tl.int64) * stride_ym, rn, N, HAS_BIAS, SPLIT_K)
