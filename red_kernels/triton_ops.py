"""Launchers of the Triton backend: the same contract as `chunked.py` (forward_stats / backward), on Triton kernels.

Forward: `forward_stats_kernel` on a grid (token blocks, vocabulary splits) writes partial (m, s, t, z_y) per
split; `merge_splits` combines them in a tiny fp32 torch step. Splitting the vocabulary lets a few hundred tokens
still fill a GPU; the token count is always on grid axis 0 (no 65,535 cap).

Backward: for chunks of rows, `dlogits_kernel` recomputes the logit tiles and writes dZ = ∂L/∂(x·wᵀ + b) into a
[chunk, V] buffer, then dX_chunk = dZ·W and dW += dZᵀ·X_chunk run as torch GEMMs (cuBLAS on a GPU) accumulated in
fp32, db += Σ_rows dZ. Memory beyond inputs/outputs is one chunk buffer; no atomics, so results are
bit-reproducible for a fixed chunk size and device.

On a GPU with bf16/fp16 inputs the kernels multiply in the input dtype on tensor cores (fp32 accumulation) and dZ
is stored in the input dtype for the GEMMs; fp32 inputs use exact fp32 (`input_precision="ieee"`) unless
RED_KERNELS_ALLOW_TF32=1. Under TRITON_INTERPRET=1 (CPU tests) each kernel runs with one large-tile config and
bf16 tiles are upcast to fp32 right after the load (the interpreter's bf16 arithmetic is wrong).
"""
from __future__ import annotations

import os

import torch
import triton

from . import triton_kernels as K

# Read once, like triton.jit does when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ALLOW_TF32 = os.environ.get("RED_KERNELS_ALLOW_TF32") == "1"

# Vocabulary splits start at multiples of this (≥ every BLOCK_V of the GPU configs, so tiles never straddle).
_SPLIT_ALIGN = 256
# Bytes of the backward dZ chunk buffer when chunk_size is not given: GPU / CPU interpreter.
_DZ_BYTES_CUDA = 1 << 28
_DZ_ELEMENTS_CPU = 1 << 24


def _gpu_configs():
    shapes = [  # BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages (every BLOCK_V divides _SPLIT_ALIGN)
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, v, k, w, s in shapes]


_KEY = ["H", "V", "HAS_BIAS", "UPCAST", "INPUT_PRECISION"]
if INTERPRET:
    _forward_kernel, _dlogits_kernel = K.forward_stats_kernel, K.dlogits_kernel
else:
    _forward_kernel = triton.autotune(configs=_gpu_configs(), key=_KEY)(K.forward_stats_kernel)
    _dlogits_kernel = triton.autotune(configs=_gpu_configs(), key=_KEY)(K.dlogits_kernel)


def _pow2_clamp(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# Largest (BLOCK_N, BLOCK_V, BLOCK_K) under the interpreter; tests lower it to exercise many tiles and H steps.
INTERPRETER_MAX_BLOCKS = (256, 2048, 256)


def interpreter_blocks(n_rows, vocab, hidden):
    """(BLOCK_N, BLOCK_V, BLOCK_K) for the interpreter: few, large tiles (cost ≈ programs × loop steps)."""
    max_n, max_v, max_k = INTERPRETER_MAX_BLOCKS
    bn = _pow2_clamp(n_rows, 16, max_n)
    bk = _pow2_clamp(hidden, 16, max_k)
    bv = _pow2_clamp(vocab, 16, min(max_v, (1 << 19) // bn))
    return bn, bv, bk


def _precision(dtype):
    """(UPCAST, INPUT_PRECISION) constexprs for input dtype `dtype`."""
    upcast = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 or upcast:
        return upcast, ("tf32" if ALLOW_TF32 and not INTERPRET else "ieee")
    return False, None  # bf16/fp16 tensor-core dot with fp32 accumulation (precision flag applies to fp32 only)


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_layout(n_rows, vocab, device, vocab_splits):
    """(splits, cols_per_split): every split non-empty; enough programs to fill the device when rows are few."""
    if vocab_splits is None:
        if device.type == "cuda" and not INTERPRET:
            token_blocks = triton.cdiv(n_rows, 128)
            vocab_splits = min(triton.cdiv(2 * _sm_count(device), token_blocks), triton.cdiv(vocab, 4 * _SPLIT_ALIGN))
        else:
            vocab_splits = 1
    align = _SPLIT_ALIGN
    if INTERPRET:  # interpreter tiles stay whole inside a split
        align = interpreter_blocks(n_rows, vocab, 16)[1]
    vocab_splits = max(1, min(int(vocab_splits), triton.cdiv(vocab, align)))
    cols = triton.cdiv(triton.cdiv(vocab, vocab_splits), align) * align
    return triton.cdiv(vocab, cols), cols


def merge_splits(m, s, t, zy):
    """Combine per-split partials [S, M] into (m, logs, ezs, zy_s) [M].

    M* = max_k m_k;  s = Σ_k s_k e^{m_k − M*};  t = Σ_k e^{m_k − M*}(t_k + (m_k − M*) s_k);  logs = log s, ezs = t/s.
    Splits are never empty, so every m_k is finite and s ≥ 1 (the max element contributes e^0).
    """
    m_all = m.amax(dim=0)
    d = m - m_all
    scale = d.exp()
    s_all = (scale * s).sum(dim=0)
    t_all = (scale * (t + d * s)).sum(dim=0)
    return m_all, s_all.log(), t_all / s_all, zy.sum(dim=0) - m_all


def _strides(x, w):
    return x.stride(0), x.stride(1), w.stride(0), w.stride(1)


def forward_stats(x, w, b, y, tau, chunk_size=None, *, vocab_splits=None):
    """Per-token (m, logs, ezs, zy_s), each fp32 [M], for compacted rows x [M, H], y [M] (see chunked.py).

    chunk_size is ignored (the forward keeps no [rows, V] block); vocab_splits overrides the split count.
    """
    n, hidden = x.shape
    vocab = w.shape[0]
    if n == 0:
        z = torch.zeros(n, dtype=torch.float32, device=x.device)
        return z, z.clone(), z.clone(), z.clone()
    splits, cols = _split_layout(n, vocab, x.device, vocab_splits)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=x.device)
    upcast, precision = _precision(x.dtype)
    y = y.contiguous()
    args = (x, w, x if b is None else b, y, part[0], part[1], part[2], part[3],
            n, vocab, hidden, cols, float(tau), *_strides(x, w))
    flags = dict(HAS_BIAS=b is not None, UPCAST=upcast, INPUT_PRECISION=precision)
    if INTERPRET:
        bn, bv, bk = interpreter_blocks(n, vocab, hidden)
        _forward_kernel[(triton.cdiv(n, bn), splits)](*args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _forward_kernel[grid](*args, **flags)
    return merge_splits(part[0], part[1], part[2], part[3])


def _launch_dlogits(x, w, b, y, m, logs, ezs, g_lp, g_h, dz, tau):
    n, hidden = x.shape
    vocab = w.shape[0]
    upcast, precision = _precision(x.dtype)
    args = (x, w, x if b is None else b, y, m, logs, ezs, g_lp, g_h, dz,
            n, vocab, hidden, float(tau), *_strides(x, w), dz.stride(0))
    flags = dict(HAS_BIAS=b is not None, UPCAST=upcast, INPUT_PRECISION=precision)
    if INTERPRET:
        bn, bv, bk = interpreter_blocks(n, vocab, hidden)
        _dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(vocab, bv))](
            *args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        _dlogits_kernel[grid](*args, **flags)


_OUT_DTYPE_GEMM = [True]  # torch.mm/addmm(..., out_dtype=float32) on CUDA half inputs; off after one failure


def _mm_fp32(out, a, b):
    """out (fp32) = a @ b, with fp32 accumulation and output even for bf16/fp16 operands."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    if _OUT_DTYPE_GEMM[0]:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_GEMM[0] = False
    out.copy_(torch.mm(a, b))


def _addmm_fp32(acc, a, b):
    """acc (fp32) += a @ b, with fp32 output even for bf16/fp16 operands."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _OUT_DTYPE_GEMM[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_GEMM[0] = False
    acc += torch.mm(a, b).float()  # each chunk's product rounded to a, then summed in fp32


def backward_rows(n_rows, vocab, dz_dtype, device, chunk_size=None):
    """Rows per backward chunk: the [rows, V] dZ buffer stays within a fixed budget."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if device.type == "cuda":
        rows = _DZ_BYTES_CUDA // (vocab * torch.finfo(dz_dtype).bits // 8)
        rows = max(64, rows // 64 * 64)
    else:
        rows = max(1, _DZ_ELEMENTS_CPU // vocab)
    return min(rows, n_rows)


def backward(x, w, b, y, tau, m, logs, ezs, g_lp, g_h, chunk_size=None, *, dz_dtype=None):
    """(dX fp32 [M, H], dW fp32 [V, H], db fp32 [V] or None) from the saved stats and g_lp, g_h [M].

    dz_dtype: dtype of the dZ buffer fed to the GEMMs; default fp32, or the input dtype for bf16/fp16 on CUDA.
    """
    n = x.shape[0]
    dev = x.device
    if g_h is None:  # entropy output unused
        g_h = torch.zeros_like(g_lp)
    dx = torch.empty(x.shape, dtype=torch.float32, device=dev)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=dev)
    db = None if b is None else torch.zeros(b.shape, dtype=torch.float32, device=dev)
    if n == 0:
        return dx, dw, db
    if dz_dtype is None:
        dz_dtype = x.dtype if (dev.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)) else torch.float32
    rows = backward_rows(n, w.shape[0], dz_dtype, dev, chunk_size)
    buf = torch.empty(rows, w.shape[0], dtype=dz_dtype, device=dev)
    w_gemm = w.to(dz_dtype)  # no copy when dtypes agree
    y = y.contiguous()
    m, logs, ezs = m.float().contiguous(), logs.float().contiguous(), ezs.float().contiguous()
    g_lp, g_h = g_lp.float().contiguous(), g_h.float().contiguous()
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        dz = buf[: sl.stop - i]
        _launch_dlogits(x[sl], w, b, y[sl], m[sl], logs[sl], ezs[sl], g_lp[sl], g_h[sl], dz, tau)
        _mm_fp32(dx[sl], dz, w_gemm)
        _addmm_fp32(dw, dz.t(), x[sl].to(dz_dtype))
        if db is not None:
            db += dz.sum(dim=0, dtype=torch.float32)
    return dx, dw, db


def forward_with_grad(x, w, b, y, tau, token_grad_fn, chunk_size=None):
    """Same contract as chunked.forward_with_grad; here one forward sweep then the recompute backward.

    token_grad_fn is called once with rows = slice(0, M). Returns (logp, entropy, dX, dW, db).
    """
    m, logs, ezs, zy_s = forward_stats(x, w, b, y, tau)
    logp, ent = zy_s - logs, logs - ezs
    g_lp, g_h = token_grad_fn(slice(0, x.shape[0]), logp, ent)
    dx, dw, db = backward(x, w, b, y, tau, m, logs, ezs, g_lp, g_h, chunk_size)
    return logp, ent, dx, dw, db
