"""Backend choice and the ONE row-chunk driver that every backend runs under.

CUDA tensors → Triton kernels (`triton.py`); CPU tensors → exact chunked PyTorch (`chunked.py`). Override per call
with `backend=` or process-wide with RED_KERNELS_BACKEND (`triton`, `torch`, `reference`). Tests force `triton`
with TRITON_INTERPRET=1 to run the kernels on CPU. 'reference' (float64, materialised logits) is answered by the
public ops themselves from `red_kernels.reference`; it never reaches this driver.

A backend module supplies only the per-chunk vocabulary work, for compacted rows x [c, H], y [c]:

    prepare(w, b)                         -> (w, b) as its kernels read them (e.g. fp32 copies), once per call
    stats(x, w, b, y, zmap, keep)         -> ((m, logs, ezs, zy_s) each fp32 [c], cache or None)
    dz(x, w, b, y, zmap, stats, g_lp, g_h, cache, out)
                                          -> dZ [c, V] = ∂L/∂(x·Wᵀ + b), written into `out` or into the cache
    stats_rows(n, V, x, chunk_size) / dz_rows(n, V, x, dtype, chunk_size) -> rows per chunk (chunk_size: the
                                          caller's override or None);   gemm_dtype(x) -> dtype of dZ for the GEMMs

`zmap` (a `LogitMap`) says how logits z come from u = x·Wᵀ + b: z = s·u/τ, or z = c·tanh(s·u/c)/τ with a
softcap c. The stats are shifted (m = max z, logs = log Σ e^{z−m}, ezs = E_p[z − m], zy_s = z_y − m), so that
log p_y = zy_s − logs and H = logs − ezs. A target id of −1 means "not among these weight rows" (vocabulary-parallel
shards): it adds no one-hot term to dZ and its zy_s is meaningless. `keep=True` lets a backend hand its logits block to `dz` (one sweep,
3 GEMMs); a backend that keeps nothing recomputes the logits in `dz` (4 GEMMs). This driver owns chunk sizing,
the fp32 accumulation of dX, dW and db, `forward_with_grad`, empty input and missing upstream gradients.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import NamedTuple

import torch

BACKENDS = ("triton", "torch", "reference")


class LogitMap(NamedTuple):
    """z = logit_scale·u / temperature, or softcap·tanh(logit_scale·u / softcap) / temperature; u = x·Wᵀ + b.

    top_k: None (the full softmax), or k — the distribution is truncated to the tokens whose z is at least the
    row's k-th largest z (ties at the boundary kept), plus the target, and renormalised (chunked backend only)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    top_k: int | None = None

    def factor(self, z):
        """∂z/∂u given z: the number s/τ, or with a softcap the tensor s·(1 − (τ·z/c)²)/τ (overwrites z)."""
        k = self.logit_scale / self.temperature
        if self.softcap is None:
            return k
        t = z.mul_(self.temperature / self.softcap)
        return t.mul_(t).neg_().add_(1.0).mul_(k)


def as_logit_map(zmap) -> LogitMap:
    """A LogitMap from a LogitMap or a plain temperature."""
    return zmap if isinstance(zmap, LogitMap) else LogitMap(float(zmap))


def resolve(backend: str | None, device) -> str:
    choice = backend if backend is not None else os.environ.get("RED_KERNELS_BACKEND") or None
    if choice is None:
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (auto), got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing red_kernels, or use backend='torch'"
        )
    return choice


def ops(name: str):
    """The backend module for 'triton' or 'torch' (not 'reference')."""
    if name not in ("triton", "torch"):
        raise ValueError(f"no kernel backend {name!r}: the driver runs 'triton' or 'torch'")
    return importlib.import_module(".triton" if name == "triton" else ".chunked", __name__)


_OUT_DTYPE_OK: dict = {}  # (kind 'mm'|'addmm', operand dtype, device type) -> out_dtype=float32 works; probed once
_log = logging.getLogger("red_kernels")


def _out_dtype_supported(kind, a):
    """Whether torch.mm/addmm(..., out_dtype=float32) runs for half operands like `a`: probed once per
    (kind, dtype, device type) on a 2×2 product, and the path taken is logged."""
    key = (kind, a.dtype, a.device.type)
    if key not in _OUT_DTYPE_OK:
        p = torch.ones(2, 2, dtype=a.dtype, device=a.device)
        o = torch.zeros(2, 2, dtype=torch.float32, device=a.device)
        try:
            if kind == "addmm":
                torch.addmm(o, p, p, out_dtype=torch.float32, out=o)
            else:
                torch.mm(p, p, out_dtype=torch.float32, out=o)
            _OUT_DTYPE_OK[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False
        how = (
            "fp32-output GEMM on the half operands"
            if _OUT_DTYPE_OK[key]
            else "unsupported: operands upcast to fp32 first (exact, slower; never rounded to the half dtype)"
        )
        _log.info(
            "red_kernels: torch.%s(out_dtype=float32) with %s on %s: %s", kind, a.dtype, a.device.type, how
        )
    return _OUT_DTYPE_OK[key]


def _mm_fp32(a, b, out, acc):
    """out (fp32) = a @ b, or += when acc, with fp32 accumulation and output even for bf16/fp16 operands
    (products are never rounded to the operands' dtype: without out_dtype support they run in fp32)."""
    if a.dtype != torch.float32 and _out_dtype_supported("addmm" if acc else "mm", a):
        if acc:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return
    a, b = a.float(), b.float()
    out.addmm_(a, b) if acc else torch.mm(a, b, out=out)


class _Grads:
    """fp32 dX [M, H], dW [V, H], db [V] (or None), accumulated chunk by chunk from dZ.

    The first chunk writes dW/db (no zero-fill pass); with no rows at all they are zeros."""

    def __init__(self, x, w, b):
        fill = torch.zeros if x.shape[0] == 0 else torch.empty
        f32 = dict(dtype=torch.float32, device=x.device)
        self.dx = torch.empty(x.shape, **f32)
        self.dw = fill(w.shape, **f32)
        self.db = None if b is None else fill(b.shape, **f32)
        self.first = True

    def add(self, dz, x_rows, w_gemm, rows):
        _mm_fp32(dz, w_gemm, self.dx[rows], acc=False)
        _mm_fp32(dz.t(), x_rows.to(dz.dtype), self.dw, acc=not self.first)
        if self.db is not None:
            part = dz.sum(dim=0, dtype=torch.float32)
            self.db.copy_(part) if self.first else self.db.add_(part)
        self.first = False

    def result(self):
        return self.dx, self.dw, self.db


def _gemm_weight(be, x, w, wk):
    dt = be.gemm_dtype(x)
    return dt, (wk if wk.dtype == dt else w.to(dt))


@torch.no_grad()
def forward_stats(be, x, w, b, y, zmap, chunk_size=None):
    """Per-token (m, logs, ezs, zy_s), each fp32 [M], for compacted rows x [M, H], y [M] (module docstring)."""
    zmap = as_logit_map(zmap)
    n = x.shape[0]
    out = torch.empty(4, n, dtype=torch.float32, device=x.device)
    wk, bk = be.prepare(w, b)
    step = max(1, be.stats_rows(n, w.shape[0], x, chunk_size))
    for i in range(0, n, step):
        sl = slice(i, i + step)
        st, _ = be.stats(x[sl], wk, bk, y[sl], zmap, keep=False)
        for k in range(4):
            out[k, sl] = st[k]
    return out[0], out[1], out[2], out[3]


@torch.no_grad()
def backward(be, x, w, b, y, zmap, stats, g_lp, g_h, chunk_size=None):
    """(dX, dW, db) in fp32 from the saved stats and the upstream grads g_lp, g_h [M] (either may be None: an
    unused output; a None g_h lets the backend skip the entropy terms)."""
    n = x.shape[0]
    if n == 0 or (g_lp is None and g_h is None):
        zeros = lambda t: None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=t.device)  # noqa
        return zeros(x), zeros(w), zeros(b)
    zmap = as_logit_map(zmap)
    g_lp = torch.zeros(n, dtype=torch.float32, device=x.device) if g_lp is None else g_lp.float()
    g_h = None if g_h is None else g_h.float()
    own = getattr(be, "backward_vocab_chunked", None)  # a backend's own chunking (Triton 'vsplit'), or None
    done = None if own is None else own(x, w, b, y, zmap, stats, g_lp, g_h, chunk_size)
    if done is not None:
        return done
    grads = _Grads(x, w, b)
    wk, bk = be.prepare(w, b)
    dt, w_gemm = _gemm_weight(be, x, w, wk)
    step = max(1, min(n, be.dz_rows(n, w.shape[0], x, dt, chunk_size)))
    buf = torch.empty(step, w.shape[0], dtype=dt, device=x.device)
    for i in range(0, n, step):
        sl = slice(i, i + step)
        c = min(n, i + step) - i
        st = tuple(s[sl] for s in stats)
        dz = be.dz(x[sl], wk, bk, y[sl], zmap, st, g_lp[sl], None if g_h is None else g_h[sl], None, buf[:c])
        grads.add(dz, x[sl], w_gemm, sl)
    return grads.result()


@torch.no_grad()
def forward_with_grad(be, x, w, b, y, zmap, token_grad_fn, chunk_size=None):
    """One sweep that also forms the gradient, for losses whose per-token gradient is local.

    token_grad_fn(rows: slice, logp [c], entropy [c]) -> (g_lp [c], g_h [c]) gives ∂L/∂log p and ∂L/∂H for the
    chunk's rows (normalisers already folded in). Returns (logp [M], entropy [M], dX, dW, db), gradients fp32.
    """
    zmap = as_logit_map(zmap)
    n = x.shape[0]
    if getattr(
        be, "wants_vocab_chunks", lambda: False
    )():  # Triton 'vsplit': stats of all rows, then its backward
        m, logs, ezs, zy_s = forward_stats(be, x, w, b, y, zmap, chunk_size)
        logp, ent = zy_s - logs, logs - ezs
        g_lp, g_h = token_grad_fn(slice(0, n), logp, ent)
        return (logp, ent, *backward(be, x, w, b, y, zmap, (m, logs, ezs, zy_s), g_lp, g_h, chunk_size))
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device)
    grads = _Grads(x, w, b)
    wk, bk = be.prepare(w, b)
    dt, w_gemm = _gemm_weight(be, x, w, wk)
    step = max(1, min(n, be.dz_rows(n, w.shape[0], x, dt, chunk_size)))
    buf = None
    for i in range(0, n, step):
        sl = slice(i, i + step)
        c = min(n, i + step) - i
        st, cache = be.stats(x[sl], wk, bk, y[sl], zmap, keep=True)
        m, logs, ezs, zy_s = st
        logp[sl] = zy_s - logs
        ent[sl] = logs - ezs
        g_lp, g_h = token_grad_fn(sl, logp[sl], ent[sl])
        if cache is None and buf is None:
            buf = torch.empty(step, w.shape[0], dtype=dt, device=x.device)
        out = None if cache is not None else buf[:c]
        dz = be.dz(x[sl], wk, bk, y[sl], zmap, st, g_lp.float(), g_h.float(), cache, out)
        grads.add(dz, x[sl], w_gemm, sl)
        del cache, dz
    return (logp, ent, *grads.result())
