"""Triton kernels of `linear_logprobs`: forward statistics and the logits gradient, never the full logits.

Notation (all per token row r, vocabulary column j): u_rj = x_r·w_j + b_j, z_rj = s·u_rj / τ, or with a softcap c
z_rj = c·tanh(s·u_rj / c) / τ (s = logit scale); m = max_j z, logs = log Σ exp(z − m),
ezs = E_p[z − m]. Kernels load x/w in their own dtype and compute in fp32: on a GPU the tile product runs as a
bf16/fp16 `tl.dot` with fp32 accumulation (UPCAST=False); in Triton's interpreter, whose bf16 arithmetic is wrong,
tiles are upcast to fp32 right after the load (UPCAST=True). The launchers live in `triton.py`.

GROUP_N > 0 (the 'grouped' variant) launches a 1-D grid whose program ids visit GROUP_N token blocks for every
vocabulary split/tile before moving on, so resident programs share X blocks and W tiles in L2; GROUP_N = 0 is the
2-D grid (token blocks on axis 0). N_BUCKET is the autotune key's bucketed row count (unused in the bodies).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    H,
    tau,
    scale,
    softcap,
    stride_xm,
    stride_xh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] in fp32 from u = X[rows]·W[cols]ᵀ + b[cols] (looping over H in BLOCK_K steps):
    z = s·u/τ, or c·tanh(s·u/c)/τ with HAS_SOFTCAP (tanh(a) = 1 − 2/(e^{2a} + 1): ±1 at overflow, never NaN).

    Masked rows/columns load zeros, so every entry is finite (masked columns hold b=0 → 0).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_mask = k < H
        xt = tl.load(x_rows + k[None, :] * stride_xh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + k[:, None] * stride_wh, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if HAS_SOFTCAP:
        a = acc * (scale / softcap)
        return (softcap / tau) * (1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))
    return acc * (scale / tau)


@triton.jit
def grouped_pid(M, n_other, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(token block, other index) of this program: the 2-D grid when GROUP_N = 0, else a 1-D grid walked in
    groups of GROUP_N token blocks (all `n_other` vocabulary splits/tiles of a group before the next group)."""
    if GROUP_N == 0:
        pid_n = tl.program_id(0)
        pid_o = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        per_group = GROUP_N * n_other
        first = (pid // per_group) * GROUP_N
        size = tl.minimum(tl.cdiv(M, BLOCK_N) - first, GROUP_N)
        local = pid % per_group
        pid_n = first + local % size
        pid_o = local // size
    return pid_n, pid_o


@triton.jit
def dz_epilogue(z, zs, logs, ezs, g_lp, g_h, hit, tau, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """dZ tile from the fp32 logits z, zs = z − m (0 on unused lanes), row stats and hit = (column == target)."""
    p = tl.exp(zs - logs[:, None])
    dz = -p * (g_lp[:, None] + g_h[:, None] * (zs - ezs[:, None]))
    dz += tl.where(hit, g_lp[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z * (tau / softcap)
        dz = dz * (1.0 - t * t)
    return dz * (scale / tau)


@triton.jit
def forward_stats_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    z_ptr,
    M,
    V,
    H,
    cols_per_split,
    n_splits,
    N_BUCKET,
    tau,
    scale,
    softcap,
    stride_xm,
    stride_xh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial softmax statistics of one (token block, vocabulary split).

    Program (i, k) owns rows [i·BLOCK_N, (i+1)·BLOCK_N) and columns [k·C, min((k+1)·C, V)), C = cols_per_split.
    It sweeps its columns in BLOCK_V tiles with an online accumulator, rescaled whenever the running max grows
    from m to m' (α = e^{m − m'}):

        s' = α·s + Σ_j e^{z_j − m'}
        t' = α·(t + (m − m')·s) + Σ_j e^{z_j − m'}·(z_j − m')        (t = Σ e^{z − m}(z − m))

    m starts at −∞ (never 0: all-negative rows must not underflow to NaN); the (m − m') term is zeroed while m is
    still −∞ and columns beyond the split are excluded with tl.where, so no −∞ − −∞ or 0·∞ is ever formed.
    It also sums z_y over the columns it owns (the target lies in exactly one split). Outputs go to row k of the
    [splits, M] fp32 buffers m, s, t, zy; `triton.merge_splits` combines them. STORE_Z (the 3-GEMM loss path)
    also writes every fp32 logits tile into z [M, V] (contiguous) for `dz_from_logits_kernel`.
    """
    pid_n, pid_s = grouped_pid(M, n_splits, BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)

    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_N,), neg_inf, dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(
            x_ptr,
            w_ptr,
            b_ptr,
            rows,
            row_mask,
            cols,
            col_mask,
            H,
            tau,
            scale,
            softcap,
            stride_xm,
            stride_xh,
            stride_wv,
            stride_wh,
            HAS_BIAS,
            HAS_SOFTCAP,
            UPCAST,
            INPUT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        if STORE_Z:
            z_ptrs = z_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :]
            tl.store(z_ptrs, z, mask=row_mask[:, None] & col_mask[None, :])
        zy += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, neg_inf)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)  # finite reference for the subtraction
        alpha = tl.exp(m_i - m_ref)  # 0 while m_i = −∞
        shift = tl.where(m_i == neg_inf, 0.0, m_i - m_ref)
        zs = z - m_ref[:, None]
        e = tl.exp(zs)  # 0 on masked columns
        zs = tl.where(col_mask[None, :], zs, 0.0)
        t_i = alpha * (t_i + shift * s_i) + tl.sum(e * zs, axis=1)
        s_i = alpha * s_i + tl.sum(e, axis=1)
        m_i = m_new
    out = pid_s * M + rows
    tl.store(m_ptr + out, m_i, mask=row_mask)
    tl.store(s_ptr + out, s_i, mask=row_mask)
    tl.store(t_ptr + out, t_i, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)


@triton.jit
def dlogits_kernel(
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
    tau,
    scale,
    softcap,
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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of ∂L/∂(x·wᵀ + b), recomputed from the saved per-row stats.

    With zs = z − m and p = exp(zs − logs) (the exact softmax, since logs = log Σ e^{zs}):

        ∂L/∂z_j = g_lp·(1[j = y] − p_j) − g_H·p_j·(zs_j − ezs) = −p_j·(g_lp + g_H·(zs_j − ezs)) + g_lp·1[j = y]
        dZ_j = ∂L/∂z_j · ∂z_j/∂u_j,   ∂z/∂u = s/τ, or s·(1 − (τ·z/c)²)/τ with a softcap (τ·z/c = tanh)

    stored (cast to dz's dtype) into the [M, V] chunk buffer; the GEMMs dX = dZ·W, dW = dZᵀ·X run afterwards.
    Masked rows load zero stats and masked columns zero weights, so nothing non-finite appears in unused lanes.
    """
    pid_n, pid_v = grouped_pid(M, tl.cdiv(V, BLOCK_V), BLOCK_N, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    z = _logits_tile(
        x_ptr,
        w_ptr,
        b_ptr,
        rows,
        row_mask,
        cols,
        col_mask,
        H,
        tau,
        scale,
        softcap,
        stride_xm,
        stride_xh,
        stride_wv,
        stride_wh,
        HAS_BIAS,
        HAS_SOFTCAP,
        UPCAST,
        INPUT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    logs = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
    ezs = tl.load(ezs_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    g_h = tl.load(gh_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)

    # unused lanes get zs = 0 (their z − m could be huge and overflow exp); they are never stored
    zs = tl.where(row_mask[:, None] & col_mask[None, :], z - m[:, None], 0.0)
    dz = dz_epilogue(
        z, zs, logs, ezs, g_lp, g_h, cols[None, :] == y[:, None], tau, scale, softcap, HAS_SOFTCAP
    )
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzm + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def dz_from_logits_kernel(
    z_ptr,
    y_ptr,
    m_ptr,
    logs_ptr,
    ezs_ptr,
    glp_ptr,
    gh_ptr,
    dz_ptr,
    M,
    V,
    tau,
    scale,
    softcap,
    stride_dzm,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The 3-GEMM loss path: dZ tile from the fp32 logits z [M, V] stored by the forward (STORE_Z), no GEMM."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    valid = row_mask[:, None] & (cols < V)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], mask=valid, other=0.0)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    logs = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
    ezs = tl.load(ezs_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    zs = tl.where(valid, z - m[:, None], 0.0)
    dz = dz_epilogue(
        z, zs, logs, ezs, g_lp, g_h, cols[None, :] == y[:, None], tau, scale, softcap, HAS_SOFTCAP
    )
    tl.store(
        dz_ptr + rows.to(tl.int64)[:, None] * stride_dzm + cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=valid,
    )
