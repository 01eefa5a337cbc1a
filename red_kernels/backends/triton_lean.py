"""The 'lean' variant of the Triton kernels: the same statistics and dZ as `triton_kernels.py`, leaner epilogue.

Differences (each a few instructions per logit on the GPU, where the GEMM tile is already fast):
* the logit map's constants come folded from the host (no divisions in the kernel) and the logits are formed in
  base 2, z₂ = z·log₂e, so every exponential is one `exp2` (the results are converted back to natural units);
* targets are compared as int32;
* interior tiles run without masks: token rows past M are clamped to row M − 1 for the loads (their results are
  never stored), H steps are unmasked when BLOCK_K divides H (EVEN_K), vocabulary tiles are unmasked except the
  when BLOCK_V does not divide V (EVEN_V; splits start at multiples of 256 ≥ BLOCK_V).

Host scalars: k_in, k_out with z₂ = k_out·u (k_in unused), or with a softcap c: z₂ = k_out·(1 − 2/(2^{k_in·u} + 1)),
k_in = 2·log₂e·s/c, k_out = log₂e·c/τ. dZ also takes k_t = ln2·τ/c (tanh = k_t·z₂) and k_d = s/τ.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import grouped_pid

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile2(
    x_ptr,
    w_ptr,
    b_ptr,
    rows_c,
    cols,
    col_mask,
    H,
    k_in,
    k_out,
    stride_xm,
    stride_xh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    MASK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Base-2 logits z₂ [BLOCK_N, BLOCK_V] (fp32) of rows rows_c (all valid) and columns cols."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows_c.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :] * stride_xh)
            if MASK_V:
                wt = tl.load(w_cols + k[:, None] * stride_wh, mask=col_mask[None, :], other=0.0)
            else:
                wt = tl.load(w_cols + k[:, None] * stride_wh)
        else:
            k_mask = k < H
            xt = tl.load(x_rows + k[None, :] * stride_xh, mask=k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & col_mask[None, :] if MASK_V else k_mask[:, None]
            wt = tl.load(w_cols + k[:, None] * stride_wh, mask=wmask, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        if MASK_V:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = k_out * (1.0 - 2.0 / (tl.exp2(acc * k_in) + 1.0))
    else:
        acc = acc * k_out
    return acc


@triton.jit
def _online2(m, s, t, zy, z2, cols, col_mask, y, MASK_V: tl.constexpr):
    """One base-2 online-softmax step over the tile z₂ (see forward_stats_kernel; t = Σ 2^{z₂−m}(z₂ − m))."""
    hit = cols[None, :] == y[:, None]
    if MASK_V:
        hit = hit & col_mask[None, :]
        z2 = tl.where(col_mask[None, :], z2, float("-inf"))
    zy += tl.sum(tl.where(hit, z2, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z2, axis=1))  # finite: every tile has a valid column
    alpha = tl.exp2(m - m_new)  # 0 while m = −∞
    shift = tl.where(m == float("-inf"), 0.0, m - m_new)
    zs = z2 - m_new[:, None]
    e = tl.exp2(zs)
    if MASK_V:
        zs = tl.where(col_mask[None, :], zs, 0.0)
    t = alpha * (t + shift * s) + tl.sum(e * zs, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, zy


@triton.jit
def lean_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    M,
    V,
    H,
    cols_per_split,
    n_splits,
    N_BUCKET,
    k_in,
    k_out,
    stride_xm,
    stride_xh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """forward_stats_kernel's partial (m, s, t, z_y) per (token block, split), in natural units. Splits are
    multiples of SPLIT_ALIGN columns, so with EVEN_V (BLOCK_V divides V) no vocabulary tile needs a mask."""
    pid_n, pid_s = grouped_pid(M, n_splits, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    rows_c = tl.minimum(rows, M - 1)
    y = tl.load(y_ptr + rows_c).to(tl.int32)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z2 = _tile2(
            x_ptr,
            w_ptr,
            b_ptr,
            rows_c,
            cols,
            col_mask,
            H,
            k_in,
            k_out,
            stride_xm,
            stride_xh,
            stride_wv,
            stride_wh,
            HAS_BIAS,
            HAS_SOFTCAP,
            UPCAST,
            INPUT_PRECISION,
            EVEN_K,
            not EVEN_V,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        m, s, t, zy = _online2(m, s, t, zy, z2, cols, col_mask, y, not EVEN_V)
    out = pid_s * M + rows
    tl.store(m_ptr + out, m * LN2, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(t_ptr + out, t * LN2, mask=row_mask)
    tl.store(zy_ptr + out, zy * LN2, mask=row_mask)


@triton.jit
def lean_dlogits_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    logs_ptr,
    ezs_ptr,
    glp_ptr,
    gh_ptr,
    dz_ptr,
    M,
    V,
    H,
    N_BUCKET,
    k_in,
    k_out,
    k_t,
    k_d,
    stride_xm,
    stride_xh,
    stride_wv,
    stride_wh,
    stride_dzm,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dlogits_kernel's dZ tile: p = 2^{z₂ − c}, c = (m + logs)·log₂e; ∂L/∂z = −p·(a + b·z₂) + g_lp·1[y] with
    a = g_lp − g_H·(m + ezs), b = g_H·ln2 (since zs − ezs = ln2·z₂ − m − ezs); then × k_d (× (1 − (k_t·z₂)²))."""
    pid_n, pid_v = grouped_pid(M, tl.cdiv(V, BLOCK_V), BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    rows_c = tl.minimum(rows, M - 1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z2 = _tile2(
        x_ptr,
        w_ptr,
        b_ptr,
        rows_c,
        cols,
        col_mask,
        H,
        k_in,
        k_out,
        stride_xm,
        stride_xh,
        stride_wv,
        stride_wh,
        HAS_BIAS,
        HAS_SOFTCAP,
        UPCAST,
        INPUT_PRECISION,
        EVEN_K,
        not EVEN_V,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    m = tl.load(m_ptr + rows_c)
    logs = tl.load(logs_ptr + rows_c)
    ezs = tl.load(ezs_ptr + rows_c)
    g_lp = tl.load(glp_ptr + rows_c)
    g_h = tl.load(gh_ptr + rows_c)
    y = tl.load(y_ptr + rows_c).to(tl.int32)
    c = (m + logs) * LOG2E
    a = g_lp - g_h * (m + ezs)
    b = g_h * LN2
    arg = z2 - c[:, None]
    if not EVEN_V:
        arg = tl.where(col_mask[None, :], arg, float("-inf"))  # padded columns: p = 0, no overflow
    p = tl.exp2(arg)
    dz = -p * (a[:, None] + b[:, None] * z2)
    dz += tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0)
    if HAS_SOFTCAP:
        th = z2 * k_t
        dz = dz * (1.0 - th * th)
    dz = dz * k_d
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzm + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
