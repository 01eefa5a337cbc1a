"""The Triton backend (CUDA default): the per-chunk contract of `backends/__init__.py`, on the kernels of
`triton_kernels.py` (and `triton_lean.py` for the 'lean' variant); variants, tile configs and vocabulary splits
are planned in `triton_plan.py`.

Forward: a forward kernel on a grid (token blocks, vocabulary splits) writes partial (m, s, t, z_y) per split;
`merge_splits` combines them in a tiny fp32 torch step. The split layout depends on V only (batch invariance);
the token count is on grid axis 0 (no 65,535 cap).

Backward: `dlogits_kernel` recomputes logit tiles and writes dZ = ∂L/∂(x·wᵀ + b) into a [rows, V] chunk buffer;
the driver runs dX = dZ·W and dW += dZᵀ·X as torch GEMMs with fp32 output, db += Σ_rows dZ. The 'vsplit' variant
(`backward_vocab_chunked`) chunks along the vocabulary instead, so each fp32 dW slice is written once per row
chunk. No atomics: bit-reproducible for a fixed config, chunk size and device.

dZ dtype for the GEMMs (`dz_dtype`): bf16 for bf16 inputs and also for fp16 inputs (fp16's range would flush
|dZ| < 6e-8 to zero; bf16 has fp32's exponent range; W and X are then cast to bf16 for the GEMMs), fp32 else.
fp32 inputs use exact fp32 dots (`input_precision="ieee"`) unless RED_KERNELS_ALLOW_TF32=1. Under
TRITON_INTERPRET=1 (CPU tests) kernels run with one large-tile config (or RED_KERNELS_TRITON_CONFIG's) and bf16
tiles are upcast to fp32 right after the load (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import triton

from . import triton_kernels as K
from . import triton_lean as L
from . import triton_plan as plan

# Read once, like triton.jit does when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ALLOW_TF32 = os.environ.get("RED_KERNELS_ALLOW_TF32") == "1"
_DZ_BYTES_CUDA = 1 << 28  # backward dZ chunk buffer when chunk_size is not given (GPU)
_DZ_ELEMENTS_CPU = 1 << 24  # (CPU interpreter)
# Largest (BLOCK_N, BLOCK_V, BLOCK_K) under the interpreter; tests lower it to exercise many tiles and H steps.
INTERPRETER_MAX_BLOCKS = (256, 2048, 256)
LOG2E = 1.4426950408889634

_KEY = ["H", "V", "N_BUCKET", "HAS_BIAS", "HAS_SOFTCAP", "UPCAST", "INPUT_PRECISION", "GROUP_N"]
_EVEN = {"EVEN_K": lambda a: a["H"] % a["BLOCK_K"] == 0, "EVEN_V": lambda a: a["V"] % a["BLOCK_V"] == 0}
# the forward's tiles must also never straddle a split (interpreter tiles can be wider than SPLIT_ALIGN)
_EVEN_FWD = dict(
    _EVEN, EVEN_V=lambda a: a["V"] % a["BLOCK_V"] == 0 and a["cols_per_split"] % a["BLOCK_V"] == 0
)
_RAW = {
    "forward": K.forward_stats_kernel,
    "dlogits": K.dlogits_kernel,
    "lean_forward": triton.heuristics(_EVEN_FWD)(L.lean_forward_kernel),
    "lean_dlogits": triton.heuristics(_EVEN)(L.lean_dlogits_kernel),
}
_TUNED: dict = {}


def _tuned(name, fp32):
    """The autotuned kernel `name` over the half or fp32 config list (GPU only), built once; the winner is cached
    per key (and on disk where this Triton supports cache_results)."""
    if (name, fp32) not in _TUNED:
        key = _KEY + (["STORE_Z"] if name == "forward" else [])
        extra = (
            {"cache_results": True}
            if "cache_results" in inspect.signature(triton.autotune).parameters
            else {}
        )
        _TUNED[name, fp32] = triton.autotune(configs=plan.gpu_configs(fp32), key=key, **extra)(_RAW[name])
    return _TUNED[name, fp32]


def _pow2_clamp(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def interpreter_blocks(n_rows, vocab, hidden):
    """(BLOCK_N, BLOCK_V, BLOCK_K) for the interpreter: few, large tiles (cost ≈ programs × loop steps).
    BLOCK_V and BLOCK_K depend on (V, H) only, so a row's arithmetic does not change with the batch."""
    max_n, max_v, max_k = INTERPRETER_MAX_BLOCKS
    bv = _pow2_clamp(vocab, 16, max_v)
    return _pow2_clamp(n_rows, 16, min(max_n, (1 << 19) // bv)), bv, _pow2_clamp(hidden, 16, max_k)


def _launch(name, grid, args, flags, n, vocab, hidden):
    """Launch kernel `name`: pinned config (RED_KERNELS_TRITON_CONFIG), interpreter tiles, or the autotuner.
    grid(meta) -> launch grid from the BLOCK_* sizes."""
    fp32 = args[0].dtype == torch.float32
    cfg = plan.fixed_config(fp32=fp32)
    if cfg is not None:
        _RAW[name][grid(cfg.kwargs)](
            *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    elif INTERPRET:
        bn, bv, bk = interpreter_blocks(n, vocab, hidden)
        blocks = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
        _RAW[name][grid(blocks)](*args, **flags, **blocks)
    else:
        _tuned(name, fp32)[grid](*args, **flags)


def _precision(dtype):
    """(UPCAST, INPUT_PRECISION) constexprs for input dtype `dtype`."""
    upcast = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32 or upcast:
        return upcast, ("tf32" if ALLOW_TF32 and not INTERPRET else "ieee")
    return (
        False,
        None,
    )  # bf16/fp16 tensor-core dot with fp32 accumulation (precision flag applies to fp32 only)


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
    return n  # the forward keeps no [rows, V] block: one launch for all rows (chunk_size is ignored)


def dz_dtype(dtype, cuda: bool):
    """dZ dtype fed to the GEMMs: bf16 for bf16 and fp16 inputs on CUDA (tensor cores; never fp16, whose
    smallest subnormal 6e-8 would flush small gradients to zero), else fp32."""
    return torch.bfloat16 if cuda and dtype in (torch.bfloat16, torch.float16) else torch.float32


def gemm_dtype(x):
    return dz_dtype(x.dtype, x.device.type == "cuda")


def dz_rows(n, vocab, x, dtype, chunk_size=None):
    """Rows per backward chunk: the [rows, V] dZ buffer stays within a fixed budget."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if x.device.type == "cuda":
        rows = _DZ_BYTES_CUDA // (vocab * torch.finfo(dtype).bits // 8)
        return max(64, rows // 64 * 64)
    return max(1, _DZ_ELEMENTS_CPU // vocab)


def _zmap_args(zm, lean):
    """Kernel scalars of a LogitMap and its HAS_SOFTCAP flag: (tau, scale, softcap) for the baseline kernels;
    folded (k_in, k_out, k_t, k_d) for the lean ones (see triton_lean.py)."""
    if getattr(zm, "top_k", None) is not None:
        raise NotImplementedError(
            "top_k truncation is implemented by the chunked ('torch') backend only: the Triton kernels sweep the "
            "vocabulary in tiles and have no per-row k-th-largest threshold. Use backend='torch' (or backend=None, "
            "which picks it when top_k is set)."
        )
    tau, s, cap = float(zm.temperature), float(zm.logit_scale), zm.softcap
    if not lean:
        return (tau, s, 1.0 if cap is None else float(cap)), cap is not None
    if cap is None:
        return (1.0, LOG2E * s / tau, 1.0, s / tau), False
    cap = float(cap)
    return (2.0 * LOG2E * s / cap, LOG2E * cap / tau, math.log(2.0) * tau / cap, s / tau), True


def _grid2(n, other, group):
    """grid(meta) for (token blocks, `other`) programs: 2-D, or 1-D when grouped."""

    def grid(meta):
        nb = triton.cdiv(n, meta["BLOCK_N"])
        o = other(meta)
        return (nb * o,) if group else (nb, o)

    return grid


def stats(x, w, b, y, zm, keep=False, *, vocab_splits=None):
    """((m, logs, ezs, zy_s) each fp32 [c], cache): cache is the fp32 logits [c, V] when keep and the variant
    is 'fused3' (then `dz` needs no GEMM), else None (`dz` recomputes the logits tiles).

    vocab_splits overrides the number of vocabulary splits of the forward grid."""
    feats = plan.variant()
    n, hidden = x.shape
    vocab = w.shape[0]
    splits, cols = plan.split_layout(vocab, vocab_splits)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=x.device)
    store_z = keep and "fused3" in feats
    lean = "lean" in feats and not store_z
    group = plan.GROUP_N if "grouped" in feats else 0
    scalars, has_cap = _zmap_args(zm, lean)
    upcast, precision = _precision(x.dtype)
    y = y.contiguous()
    zbuf = torch.empty(n, vocab, dtype=torch.float32, device=x.device) if store_z else None
    outs = (x, w, x if b is None else b, y, part[0], part[1], part[2], part[3])
    sizes = (n, vocab, hidden, cols, splits, plan.n_bucket(n), *scalars[: 2 if lean else 3], *_strides(x, w))
    flags = dict(
        HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, UPCAST=upcast, INPUT_PRECISION=precision, GROUP_N=group
    )
    if lean:
        name, args = "lean_forward", outs + sizes
    else:
        name, args = "forward", outs + (part if zbuf is None else zbuf,) + sizes
        flags["STORE_Z"] = store_z
    _launch(name, _grid2(n, lambda meta: splits, group), args, flags, n, vocab, hidden)
    return merge_splits(part[0], part[1], part[2], part[3]), zbuf


def dz(x, w, b, y, zm, st, g_lp, g_h, cache, out):
    """dZ of one chunk into `out` [c, V] (fp32 or bf16; allocated when None): from the kept logits `cache`
    (fused3), else recomputed from the saved stats."""
    m, logs, ezs, _ = (t.float().contiguous() for t in st)
    g_lp = g_lp.float().contiguous()
    g_h = torch.zeros_like(g_lp) if g_h is None else g_h.float().contiguous()
    n, hidden = x.shape
    vocab = w.shape[0]
    if out is None:
        out = torch.empty(n, vocab, dtype=gemm_dtype(x), device=x.device)
    feats = plan.variant()
    if cache is not None:
        return _dz_from_logits(cache, y.contiguous(), m, logs, ezs, g_lp, g_h, zm, out)
    lean = "lean" in feats
    group = plan.GROUP_N if "grouped" in feats else 0
    upcast, precision = _precision(x.dtype)
    scalars, has_cap = _zmap_args(zm, lean)
    args = (
        x,
        w,
        x if b is None else b,
        y.contiguous(),
        m,
        logs,
        ezs,
        g_lp,
        g_h,
        out,
        n,
        vocab,
        hidden,
        plan.n_bucket(n),
        *scalars,
        *_strides(x, w),
        out.stride(0),
    )
    flags = dict(
        HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, UPCAST=upcast, INPUT_PRECISION=precision, GROUP_N=group
    )
    _launch(
        "lean_dlogits" if lean else "dlogits",
        _grid2(n, lambda meta: triton.cdiv(vocab, meta["BLOCK_V"]), group),
        args,
        flags,
        n,
        vocab,
        hidden,
    )
    return out


def _dz_from_logits(z, y, m, logs, ezs, g_lp, g_h, zm, out):
    n, vocab = z.shape
    bn, bv = (64, 1024) if INTERPRET else (16, 512)
    (tau, s, cap), has_cap = _zmap_args(zm, False)
    K.dz_from_logits_kernel[(triton.cdiv(n, bn), triton.cdiv(vocab, bv))](
        z,
        y,
        m,
        logs,
        ezs,
        g_lp,
        g_h,
        out,
        n,
        vocab,
        tau,
        s,
        cap,
        out.stride(0),
        HAS_SOFTCAP=has_cap,
        BLOCK_N=bn,
        BLOCK_V=bv,
        **({} if INTERPRET else {"num_warps": 4}),
    )
    return out


def wants_vocab_chunks():
    """True under 'vsplit': the loss path then takes the stats of all rows first and runs this backward."""
    return "vsplit" in plan.variant()


def backward_vocab_chunked(x, w, b, y, zm, st, g_lp, g_h, chunk_size=None):
    """The 'vsplit' backward, or None under other variants (the driver's row-chunk loop runs then).

    Row chunks of `chunk_size` rows (default: as many as fit the dZ budget with ≥ SPLIT_ALIGN columns), each swept
    in vocabulary chunks [v0, v1): dZ[:, v0:v1] from the same kernel on w[v0:v1] (targets shifted by v0), then
    dW[v0:v1] = dZᵀ·X (written by the first row chunk, accumulated by later ones), dX += dZ·W[v0:v1]."""
    if not wants_vocab_chunks():
        return None
    from . import _mm_fp32

    n, hidden = x.shape
    vocab = w.shape[0]
    dt = gemm_dtype(x)
    wk, bk = prepare(w, b)
    w_g = w if w.dtype == dt else w.to(dt)
    budget = _DZ_BYTES_CUDA // (torch.finfo(dt).bits // 8) if x.device.type == "cuda" else _DZ_ELEMENTS_CPU
    rows = min(n, int(chunk_size) if chunk_size else max(1, budget // plan.SPLIT_ALIGN))
    vc = min(vocab, max(plan.SPLIT_ALIGN, budget // rows // plan.SPLIT_ALIGN * plan.SPLIT_ALIGN))
    f32 = dict(dtype=torch.float32, device=x.device)
    dx, dw = torch.zeros(x.shape, **f32), torch.empty(w.shape, **f32)
    db = None if b is None else torch.empty(b.shape, **f32)
    buf = torch.empty(rows, vc, dtype=dt, device=x.device)
    for r0 in range(0, n, rows):
        r = slice(r0, min(n, r0 + rows))
        xr, first = x[r], r0 == 0
        xg = xr.to(dt)
        st_r = tuple(t[r] for t in st)
        for v0 in range(0, vocab, vc):
            v = slice(v0, min(vocab, v0 + vc))
            d = dz(
                xr,
                wk[v],
                None if bk is None else bk[v],
                y[r] - v0,
                zm,
                st_r,
                g_lp[r],
                None if g_h is None else g_h[r],
                None,
                buf[: xr.shape[0], : v.stop - v0],
            )
            _mm_fp32(d, w_g[v], dx[r], acc=True)
            _mm_fp32(d.t(), xg, dw[v], acc=not first)
            if db is not None:
                part = d.sum(dim=0, dtype=torch.float32)
                db[v].copy_(part) if first else db[v].add_(part)
    return dx, dw, db
