"""The Triton backend (CUDA default): the per-chunk contract of `backends/__init__.py`, on the kernels of
`triton_kernels.py`.

Forward: `forward_stats_kernel` on a grid (token blocks, vocabulary splits) writes partial (m, s, t, z_y) per
split; `merge_splits` combines them in a tiny fp32 torch step. Splitting the vocabulary lets a few hundred tokens
still fill a GPU; the token count is always on grid axis 0 (no 65,535 cap).

Backward: for chunks of rows, `dlogits_kernel` recomputes the logit tiles and writes dZ = ∂L/∂(x·wᵀ + b) into a
[chunk, V] buffer; the driver then runs dX_chunk = dZ·W and dW += dZᵀ·X_chunk as torch GEMMs (cuBLAS on a GPU)
accumulated in fp32, db += Σ_rows dZ. Memory beyond inputs/outputs is one chunk buffer; no atomics, so results are
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


_KEY = ["H", "V", "HAS_BIAS", "HAS_SOFTCAP", "UPCAST", "INPUT_PRECISION"]
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


def prepare(w, b):
    """The kernels read w in its own dtype through its strides; b is read with stride 1, so a strided bias view
    (e.g. a slice of a larger tensor) is made contiguous here (a [V] copy)."""
    return w, (None if b is None else b.contiguous())


def stats_rows(n, vocab, x, chunk_size=None):
    return n      # the forward keeps no [rows, V] block: one launch for all rows (chunk_size is ignored)


def gemm_dtype(x):
    """dZ dtype fed to the GEMMs: the input dtype for bf16/fp16 on CUDA (tensor cores), else fp32."""
    half = x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
    return x.dtype if half else torch.float32


def dz_rows(n, vocab, x, dtype, chunk_size=None):
    """Rows per backward chunk: the [rows, V] dZ buffer stays within a fixed budget."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if x.device.type == "cuda":
        rows = _DZ_BYTES_CUDA // (vocab * torch.finfo(dtype).bits // 8)
        return max(64, rows // 64 * 64)
    return max(1, _DZ_ELEMENTS_CPU // vocab)


def _zmap_args(zm):
    """(tau, scale, softcap) kernel scalars and the HAS_SOFTCAP flag of a LogitMap."""
    cap = zm.softcap
    return (float(zm.temperature), float(zm.logit_scale), 1.0 if cap is None else float(cap)), cap is not None


def stats(x, w, b, y, zm, keep=False, *, vocab_splits=None):
    """((m, logs, ezs, zy_s) each fp32 [c], None): nothing is kept, `dz` recomputes the logits tiles.

    vocab_splits overrides the number of vocabulary splits of the forward grid."""
    n, hidden = x.shape
    vocab = w.shape[0]
    splits, cols = _split_layout(n, vocab, x.device, vocab_splits)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=x.device)
    scalars, has_cap = _zmap_args(zm)
    upcast, precision = _precision(x.dtype)
    y = y.contiguous()
    args = (x, w, x if b is None else b, y, part[0], part[1], part[2], part[3],
            n, vocab, hidden, cols, *scalars, *_strides(x, w))
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, UPCAST=upcast, INPUT_PRECISION=precision)
    if INTERPRET:
        bn, bv, bk = interpreter_blocks(n, vocab, hidden)
        _forward_kernel[(triton.cdiv(n, bn), splits)](*args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _forward_kernel[grid](*args, **flags)
    return merge_splits(part[0], part[1], part[2], part[3]), None


def dz(x, w, b, y, zm, st, g_lp, g_h, cache, out):
    """dZ of one chunk, recomputed from the saved stats by `dlogits_kernel` into `out` [c, V] (fp32 or half)."""
    m, logs, ezs, _ = (t.float().contiguous() for t in st)
    g_lp = g_lp.float().contiguous()
    g_h = torch.zeros_like(g_lp) if g_h is None else g_h.float().contiguous()
    n, hidden = x.shape
    vocab = w.shape[0]
    upcast, precision = _precision(x.dtype)
    scalars, has_cap = _zmap_args(zm)
    args = (x, w, x if b is None else b, y.contiguous(), m, logs, ezs, g_lp, g_h, out,
            n, vocab, hidden, *scalars, *_strides(x, w), out.stride(0))
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, UPCAST=upcast, INPUT_PRECISION=precision)
    if INTERPRET:
        bn, bv, bk = interpreter_blocks(n, vocab, hidden)
        _dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(vocab, bv))](
            *args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        _dlogits_kernel[grid](*args, **flags)
    return out
