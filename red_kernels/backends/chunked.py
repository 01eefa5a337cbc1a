"""The exact chunked PyTorch backend (CPU default): one [chunk, V] fp32 block of logits at a time.

Per token, with z = s·u/τ or c·tanh(s·u/c)/τ (u = x·Wᵀ + b, see LogitMap) and m = max z, the stats are shifted so that one-hot-like rows lose no precision:
logs = log Σ exp(z − m), ezs = E_p[z − m], zy_s = z_y − m. Then log p_y = zy_s − logs, H = logs − ezs and

    ∂L/∂z_j = g_lp·(1[j = y] − p_j) − g_H·p_j·((z_j − m) − ezs),     dZ = ∂L/∂u = ∂L/∂z · ∂z/∂u.

`stats(..., keep=True)` hands the shifted block and its exponentials to `dz`, so a loss that knows its per-token
gradient right away needs one sweep (3 GEMMs); the row-chunk loop and the dX/dW/db GEMMs live in the driver
(`backends/__init__.py`).
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


def stats_rows(n, vocab, x, chunk_size=None):
    return rows_per_chunk(vocab, chunk_size)


def dz_rows(n, vocab, x, dtype, chunk_size=None):
    return rows_per_chunk(vocab, chunk_size)


def gemm_dtype(x):
    return torch.float32


def prepare(w, b):
    """fp32 copies (no copy for fp32 inputs) that every chunk's logits GEMM reads."""
    return w.float(), (None if b is None else b.float())


def _logits(x, w32, b32, zm):
    z = x.float() @ w32.t()
    if b32 is not None:
        z += b32
    if zm.softcap is not None:
        return z.mul_(zm.logit_scale / zm.softcap).tanh_().mul_(zm.softcap / zm.temperature)
    k = zm.logit_scale / zm.temperature
    return z if k == 1.0 else z.mul_(k)


def _dropped(z, y, top_k):
    """[c, V] bool: the tokens outside the top-k truncation (z below the row's k-th largest value, and not the
    target), or None without truncation. The kept set is piecewise constant in z, so it carries no gradient."""
    if top_k is None or top_k >= z.shape[1]:
        return None
    kth = torch.topk(z, top_k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    drop = z < kth
    rows = torch.arange(z.shape[0], device=z.device)
    drop[rows[y >= 0], y[y >= 0]] = False  # the target is always scored (finite log-prob)
    return drop


def _shift(z, m, drop):
    """(zs, e) = (z − m, exp(z − m)) in place, with e = 0 and zs = 0 on dropped tokens (so e·zs stays 0)."""
    zs = z.sub_(m[:, None])
    e = zs.exp()
    if drop is not None:
        e.masked_fill_(drop, 0.0)
        zs.masked_fill_(drop, 0.0)
    return zs, e


def stats(x, w32, b32, y, zm, keep=False):
    """((m, logs, ezs, zy_s) [c], cache) for one chunk; cache = (zs, e, s) when keep (e = exp(z − m), p = e/s).
    With zm.top_k the sums run over the kept tokens only (m, the row maximum, is always kept)."""
    z = _logits(x, w32, b32, zm)
    m = z.amax(dim=1)
    zs, e = _shift(z, m, _dropped(z, y, getattr(zm, "top_k", None)))  # shifted logits, ≤ 0 (in place)
    s = e.sum(dim=1)
    logs = s.log()
    ezs = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(-1) / s  # row dots without a block temporary
    zy_s = zs.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # y = −1 (target on another shard): unused
    return (m, logs, ezs, zy_s), ((zs, e, s) if keep else None)


def dz(x, w32, b32, y, zm, st, g_lp, g_h, cache=None, out=None):
    """dZ [c, V] fp32, computed in place over the (kept or recomputed) block; `out` is unused (no copy needed).

    g_lp·(1[y] − p) − g_H·p·(zs − ezs)  =  e·(a·zs + c) + g_lp·1[y],  a = −g_H/s,  c = (g_H·ezs − g_lp)/s."""
    m, logs, ezs, _ = st
    if cache is None:
        z = _logits(x, w32, b32, zm)
        zs, e = _shift(z, m, _dropped(z, y, getattr(zm, "top_k", None)))
        s = logs.exp()
    else:
        zs, e, s = cache
    factor = zm.factor(None if zm.softcap is None else zs + m[:, None])  # ∂z/∂u: a number, or a [c, V] block
    if g_h is None:  # entropy unused: dz = −e·g_lp/s + g_lp·1[y]
        d = e.mul_((-g_lp / s)[:, None])
    else:
        a = -g_h / s
        c = (g_h * ezs - g_lp) / s
        d = e.mul_(zs.mul_(a[:, None]).add_(c[:, None]))
    d.scatter_add_(1, y.clamp(min=0)[:, None], torch.where(y >= 0, g_lp, 0.0)[:, None])
    return d.mul_(factor) if isinstance(factor, torch.Tensor) or factor != 1.0 else d
