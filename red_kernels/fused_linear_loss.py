"""A scalar loss Σ_t f_t(log p_t, H_t) over compacted token rows, with its gradient formed during the op.

Because f is a sum of per-token terms, ∂L/∂log p_t and ∂L/∂H_t are local: they are known as soon as a token's
log p and H are. So the hidden/weight gradients are computed eagerly in the forward call and handed to autograd
(scaled by the upstream gradient of the loss):

* 'torch' backend: one chunked sweep (logits → stats → per-token grads → dZ → dX, dW), 3 GEMM-shaped passes;
* 'triton' backend: per row chunk, the forward kernel, then the recompute dZ kernel right away (1 forward + 1
  recompute vocabulary sweep, the same as linear_logprobs forward+backward).
"""

from __future__ import annotations

import torch

from . import backends, vocab_parallel


class _PrecomputedGrad(torch.autograd.Function):
    """loss → loss, with d loss / d(x, w, b) already computed as (dx, dw, db)."""

    @staticmethod
    def forward(ctx, loss, x, w, b, dx, dw, db):
        ctx.save_for_backward(dx, dw, db)
        ctx.has_bias = b is not None
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        # In place: the saved gradients are used once (the loss is a scalar, its graph is not retained),
        # which saves allocating another V×H buffer.
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "red_kernels losses support one backward pass per forward (their gradients are "
                "formed in the forward call); recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        dx, dw, db = ctx.saved_tensors
        grads = [t if t is None else t.mul_(g.to(t.dtype)) for t in (dx, dw, db)]
        return (None, grads[0], grads[1], grads[2] if ctx.has_bias else None, None, None, None)


def fused_linear_token_loss(x, w, b, y, zmap, token_loss, be, chunk_size=None, shard=None):
    """L = Σ_chunks token_loss(rows, logp, H) with exact gradients w.r.t. x [M, H], w [V, H], b [V].

    token_loss(rows: slice, logp [c], entropy [c]) must return the chunk's scalar loss as a differentiable
    function of its logp/entropy arguments (plain torch ops). `be` is the backend module (backends.ops(name)).
    With a VocabShard (vocab_parallel.py; y are then local ids, −1 off-shard) the statistics of all rows are merged
    across ranks first, the loss runs once on all rows (the same on every rank), then the recompute backward
    forms this shard's dW/db and the all-reduced dX. Returns (loss 0-dim fp32, logp [M], entropy [M]) in fp32,
    logp/entropy detached.
    """
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))

    def grads(rows, logp, ent):
        nonlocal total
        lp = logp.detach().requires_grad_(needs_grad)
        h = ent.detach().requires_grad_(needs_grad)
        with torch.enable_grad() if needs_grad else torch.no_grad():
            loss = token_loss(rows, lp, h)
        total = total + loss.detach().float()
        if not needs_grad:
            return None
        g_lp, g_h = torch.autograd.grad(loss, (lp, h), allow_unused=True)
        return (torch.zeros_like(lp) if g_lp is None else g_lp), (torch.zeros_like(h) if g_h is None else g_h)

    xd, wd, bd = x.detach(), w.detach(), (None if b is None else b.detach())
    if not needs_grad or shard is not None:
        with torch.no_grad():
            stats = backends.forward_stats(be, xd, wd, bd, y, zmap, chunk_size)
            if shard is not None:
                stats = vocab_parallel.merge_stats(stats, y, shard)
        m, logs, ezs, zy_s = stats
        logp, ent = zy_s - logs, logs - ezs
        g = grads(slice(None), logp, ent)
        if not needs_grad:
            return total, logp, ent
        with torch.no_grad():
            dx, dw, db = backends.backward(be, xd, wd, bd, y, zmap, stats, g[0], g[1], chunk_size)
            dx = vocab_parallel.reduce_hidden_grad(dx, shard)
    else:
        with torch.no_grad():
            logp, ent, dx, dw, db = backends.forward_with_grad(be, xd, wd, bd, y, zmap, grads, chunk_size)
    loss = _PrecomputedGrad.apply(
        total, x, w, b, dx.to(x.dtype), dw.to(w.dtype), None if db is None else db.to(b.dtype)
    )
    return loss, logp, ent
