"""Exact chunked PyTorch path (the CPU backend): never holds more than one [chunk, V] block of logits.

Per token, with z = (x·Wᵀ + b)/τ, m = max z, the stats kept are shifted so that one-hot-like rows lose no
precision:  logs = log Σ exp(z − m),  ezs = E_p[z − m].  Then

    log p_y = (z_y − m) − logs,     H = logs − ezs,
    ∂L/∂z_j = g_lp·(1[j = y] − p_j) − g_H·p_j·((z_j − m) − ezs),    dX = dZ·W/τ,  dW = dZᵀ·X/τ,  db = Σ dZ/τ.

`forward_stats` + `backward` recompute the logits in backward (4 GEMM sweeps, memory O(chunk·V)).
`forward_with_grad` forms the gradient during the forward sweep when the per-token loss is known there
(3 GEMM sweeps): that is what the fused losses use.
"""
from __future__ import annotations

import torch

# Elements of one [chunk, V] fp32 block: 2^25 (128 MiB, ~220 rows at V = 152k); two such blocks live at once.
# Larger chunks mean fewer read-modify-writes of the fp32 dW accumulator (V·H) and better GEMM shapes.
CHUNK_ELEMENTS = 1 << 25


def rows_per_chunk(vocab: int, chunk_size: int | None = None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _logits(x, w32, b32, tau):
    z = x.float() @ w32.t()
    if b32 is not None:
        z += b32
    if tau != 1.0:
        z /= tau
    return z


def _stats(z, y):
    """Shifted stats of a logits block; overwrites z with z − m.

    Returns (m, zs, e, s, logs, ezs, zy_s) where e = exp(zs) is unnormalised (p = e / s): skipping the division
    saves one pass over the block."""
    m = z.amax(dim=1)
    zs = z.sub_(m[:, None])                   # shifted logits, ≤ 0
    e = zs.exp()
    s = e.sum(dim=1)
    logs = s.log()
    ezs = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(-1) / s   # row dots without a block temporary
    zy_s = zs.gather(1, y[:, None]).squeeze(1)
    return m, zs, e, s, logs, ezs, zy_s


def _dz(zs, e, s, y, ezs, g_lp, g_h, tau):
    """∂L/∂z_raw for one chunk, computed in place over zs and e (neither is needed afterwards).

    g_lp·(1[y] − p) − g_H·p·(zs − ezs)  =  −e·(g_lp + g_H·(zs − ezs))/s + g_lp·1[y],   p = e/s."""
    if g_h is None:                            # entropy unused: dz = −e·g_lp/s + g_lp·1[y]
        dz = e.mul_((-g_lp / s)[:, None])
    else:                                      # dz = e·(a·zs + c) + g_lp·1[y],  c = −(g_lp − g_h·ezs)/s
        a = -g_h / s
        c = (g_h * ezs - g_lp) / s
        dz = e.mul_(zs.mul_(a[:, None]).add_(c[:, None]))
    dz.scatter_add_(1, y[:, None], g_lp[:, None])
    if tau != 1.0:
        dz /= tau
    return dz


def _grad_buffers(x, w, b):
    """fp32 dW [V, H] and db [V] (or None): left unfilled (the first chunk writes them) unless there are no rows."""
    fill = torch.zeros if x.shape[0] == 0 else torch.empty
    dw = fill(w.shape, dtype=torch.float32, device=x.device)
    return dw, (None if b is None else fill(b.shape, dtype=torch.float32, device=x.device))


def _as_fp32(w, b):
    return w.float(), (None if b is None else b.float())


@torch.no_grad()
def forward_stats(x, w, b, y, tau, chunk_size=None):
    """Per-token (m, logs, ezs, zy_s), each fp32 [M], for compacted rows x [M, H], y [M] (module docstring)."""
    n = x.shape[0]
    w32, b32 = _as_fp32(w, b)
    out = torch.empty(4, n, dtype=torch.float32, device=x.device)
    step = rows_per_chunk(w.shape[0], chunk_size)
    for i in range(0, n, step):
        z = _logits(x[i:i + step], w32, b32, tau)
        m, zs, e, s, logs, ezs, zy_s = _stats(z, y[i:i + step])
        out[0, i:i + step] = m
        out[1, i:i + step] = logs
        out[2, i:i + step] = ezs
        out[3, i:i + step] = zy_s
        del z, zs, e
    return out[0], out[1], out[2], out[3]


@torch.no_grad()
def backward(x, w, b, y, tau, m, logs, ezs, g_lp, g_h, chunk_size=None):
    """(dX, dW, db) in fp32 from the saved stats and the per-token upstream grads g_lp, g_h [M] (g_h may be None
    when the entropy output is unused: one pass less per block)."""
    w32, b32 = _as_fp32(w, b)
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    dw, db = _grad_buffers(x, w, b)
    step = rows_per_chunk(w.shape[0], chunk_size)
    for i in range(0, x.shape[0], step):
        sl = slice(i, i + step)
        z = _logits(x[sl], w32, b32, tau)
        zs = z.sub_(m[sl, None])
        e = zs.exp()
        g_h_rows = None if g_h is None else g_h[sl].float()
        dz = _dz(zs, e, logs[sl].exp(), y[sl], ezs[sl], g_lp[sl].float(), g_h_rows, tau)
        _accumulate(dz, x[sl], w32, dx[sl], dw, db, first=i == 0)
        del z, zs, e, dz
    return dx, dw, db


def _accumulate(dz, xc, w32, dx_out, dw, db, first):
    """dX rows = dZ·W;  dW (+)= dZᵀ·X;  db (+)= Σ dZ. The first chunk writes dW/db (no zero-fill pass)."""
    torch.matmul(dz, w32, out=dx_out)
    if first:
        torch.mm(dz.t(), xc.float(), out=dw)
    else:
        dw.addmm_(dz.t(), xc.float())
    if db is not None:
        if first:
            torch.sum(dz, dim=0, out=db)
        else:
            db += dz.sum(dim=0)


@torch.no_grad()
def forward_with_grad(x, w, b, y, tau, token_grad_fn, chunk_size=None):
    """One sweep that also forms the gradient, for losses whose per-token gradient is local.

    token_grad_fn(rows: slice, logp [c], entropy [c]) -> (g_lp [c], g_h [c]) gives ∂L/∂log p and ∂L/∂H for
    the chunk's rows (any normalisers must already be folded in). Returns (logp [M], entropy [M], dX, dW, db),
    gradients in fp32.
    """
    n = x.shape[0]
    w32, b32 = _as_fp32(w, b)
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    dw, db = _grad_buffers(x, w, b)
    step = rows_per_chunk(w.shape[0], chunk_size)
    for i in range(0, n, step):
        sl = slice(i, i + step)
        z = _logits(x[sl], w32, b32, tau)
        _, zs, e, s, logs, ezs, zy_s = _stats(z, y[sl])
        logp[sl] = zy_s - logs
        ent[sl] = logs - ezs
        g_lp, g_h = token_grad_fn(sl, logp[sl], ent[sl])
        dz = _dz(zs, e, s, y[sl], ezs, g_lp.float(), g_h.float(), tau)
        _accumulate(dz, x[sl], w32, dx[sl], dw, db, first=i == 0)
        del z, zs, e, dz
    return logp, ent, dx, dw, db
