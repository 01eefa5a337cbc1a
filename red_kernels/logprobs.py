"""`linear_logprobs`: per-token log p(target) and entropy straight from hidden states and the lm_head weight."""

from __future__ import annotations

import contextlib
import functools

import torch

from . import backends, vocab_parallel
from ._validate import check_linear_inputs
from .reference import reference_logprobs


def autocast_off(device):
    """A region where a caller's torch.autocast does not re-cast our ops on `device`'s type: they keep their own
    precision policy (fp32 logits/statistics, fp32 dX/dW accumulation) and output dtypes, as outside autocast."""
    kind = device.type
    return (
        torch.autocast(kind, enabled=False)
        if torch.amp.is_autocast_available(kind)
        else contextlib.nullcontext()
    )


def without_autocast(op):
    """Decorator: run a public op (first argument: hidden) with autocast off for the hidden states' device."""

    @functools.wraps(op)
    def run(hidden, *args, **kwargs):
        with autocast_off(hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")):
            return op(hidden, *args, **kwargs)

    return run


class _LinearLogprobs(torch.autograd.Function):
    """Compacted rows only: x [M, H], y [M] valid ids. Returns (logp [M], entropy [M]) in fp32.
    Forward and backward run with autocast off (backward sees the autocast state of whoever calls .backward())."""

    @staticmethod
    def forward(ctx, x, w, b, y, zmap, be, chunk_size, shard):
        with autocast_off(x.device):
            return _LinearLogprobs._forward(ctx, x, w, b, y, zmap, be, chunk_size, shard)

    @staticmethod
    def _forward(ctx, x, w, b, y, zmap, be, chunk_size, shard):
        stats = backends.forward_stats(be, x, w, b, y, zmap, chunk_size)
        if (
            shard is not None
        ):  # y: local ids (−1 off-shard); the merged stats are those of the full vocabulary
            stats = vocab_parallel.merge_stats(stats, y, shard)
        m, logs, ezs, zy_s = stats
        ctx.save_for_backward(x, w, b, y, *stats)
        ctx.zmap, ctx.be, ctx.chunk_size, ctx.shard = zmap, be, chunk_size, shard
        ctx.set_materialize_grads(False)  # an unused output arrives as None: its backward terms are skipped
        return zy_s - logs, logs - ezs

    @staticmethod
    def backward(ctx, g_lp, g_h):
        x, w, b, y, *stats = ctx.saved_tensors
        with autocast_off(x.device):
            dx, dw, db = backends.backward(ctx.be, x, w, b, y, ctx.zmap, stats, g_lp, g_h, ctx.chunk_size)
            if ctx.shard is not None:
                dx = vocab_parallel.reduce_hidden_grad(dx, ctx.shard)
        return (
            dx.to(x.dtype),
            dw.to(w.dtype),
            None if db is None else db.to(b.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def compact_rows(hidden, targets, ignore_index):
    """Flatten to [N, H] / [N] and keep only rows whose target is not ignore_index.

    Returns (x [M, H], y [M], index [M] of kept rows in the flat order). One host sync (nonzero) on CUDA.
    """
    x = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    index = (y != ignore_index).nonzero().squeeze(1)
    return x.index_select(0, index), y.index_select(0, index).long(), index


def scatter_rows(values, index, n, shape):
    """Inverse of compact_rows for a per-row value: zeros for ignored rows (differentiable)."""
    out = values.new_zeros(n)
    return out.index_copy(0, index, values).reshape(shape)


def _top_k_backend(name, backend, process_group):
    """The backend a top_k call runs on: the chunked 'torch' path when Triton was only the automatic choice."""
    if process_group is not None:
        raise NotImplementedError(
            "top_k with process_group (vocabulary-parallel shards) is not supported: the k-th largest logit of a "
            "row needs every rank's vocabulary. Gather the head, or score the full softmax (top_k=None)."
        )
    if name != "triton":
        return name
    if backend is None:
        return "torch"
    raise NotImplementedError(
        "top_k is implemented by the chunked backend only (the Triton kernels sweep the vocabulary in tiles, with "
        "no per-row k-th-largest threshold): pass backend='torch' or backend=None."
    )


@without_autocast
def linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    return_entropy=True,
    backend=None,
    chunk_size=None,
    check_inputs=True,
    softcap=None,
    logit_scale=1.0,
    process_group=None,
    vocab_start=None,
    reduce_hidden_grad=True,
    top_k=None,
):
    """Per-token log-probabilities of `targets` and full-vocabulary entropy, without materialising logits.

    With u = hidden·weightᵀ + bias, z = logit_scale·u / temperature — or, with a softcap,
    z = softcap·tanh(logit_scale·u / softcap) / temperature — and p = softmax(z):
    logprobs = log p[target],  entropy = −Σ_v p_v log p_v  (nats).

    Args:
        hidden: [..., H] last hidden states (fp32, bf16 or fp16).
        weight: [V, H] lm_head weight, same dtype as hidden.
        targets: [...] integer token ids in [0, V), or `ignore_index` for rows to skip.
        bias: optional [V] lm_head bias.
        temperature: > 0; logits are divided by it (use the rollout temperature for RL log-probs).
        ignore_index: target id marking ignored rows (prompt, padding): they give 0, get zero gradient and
            are removed before any GEMM-shaped work.
        return_entropy: if False the second output is None (the entropy costs nothing extra to compute,
            but a caller that does not use it should not hold on to it).
        backend: None (auto: CUDA → 'triton', CPU → 'torch'), 'triton', 'torch' or 'reference' (float64,
            materialised logits, tests only). The env var RED_KERNELS_BACKEND sets the default.
        chunk_size: rows per chunk on the 'torch' backend (default: [chunk, V] ≈ 2^24 elements).
        check_inputs: validate target range and finiteness (costs host syncs; turn off under CUDA graphs).
        softcap: None, or c > 0 for tanh soft-capping of the logits (Gemma's `final_logit_softcapping`).
        logit_scale: s > 0 multiplying the logits before the softcap (Cohere's `logit_scale`; Granite's
            `logits_scaling` is 1/s).
        process_group: None, or a torch.distributed group whose ranks each hold a contiguous slice of the
            vocabulary in rank order: `weight` [V_r, H] (and `bias` [V_r]) are this rank's rows, `hidden` and
            `targets` (global ids) are the same on every rank. Costs one tiny layout all-gather and two
            all-reduces of [N]/[3, N] fp32 forward, never the weight (red_kernels/vocab_parallel.py). Every rank
            returns the full log p and entropy; the weight/bias gradients are the shard's.
        vocab_start: this rank's first vocabulary id (checked against the shard sizes; default learned).
        reduce_hidden_grad: with process_group, all-reduce dX so every rank holds the full hidden gradient
            (the reduce of a Megatron `copy_to_tensor_parallel_region`); False for frameworks that already
            reduce it — then each rank's dX is its shard's partial sum.
        top_k: None (default: p is the full softmax), or k ≥ 1 to score the distribution a top-k sampler draws
            from: p is renormalised over the tokens whose z is at least the row's k-th largest z (ties at the
            boundary kept, as transformers' TopKLogitsWarper keeps them), so logprobs and entropy are those of the
            truncated distribution and ratios against a top-k sampler's log-probs compare like with like. A target
            outside that set (possible once the policy has moved away from the sampler) is scored within the set
            plus itself, which keeps its log-prob finite. The set is piecewise constant: no gradient flows through
            the threshold. Exact on the chunked 'torch' backend, which holds each row's whole vocabulary in one
            block; the Triton kernels sweep the vocabulary in tiles and do not implement it: with backend=None a
            top_k call runs the 'torch' path (on CUDA too), with backend='triton' it raises NotImplementedError.
            Not with process_group (the k-th largest would need the vocabulary of every rank).

            There is no top_p: which tokens a nucleus keeps depends on the sorted cumulative mass of the whole row,
            which tile statistics cannot give in one sweep (an exact threshold needs a search over repeated sweeps
            of the vocabulary GEMM, or a full-row sort), and samplers differ in how they combine it with top_k and
            temperature and break ties (vLLM applies top-k first, then top-p on the renormalised rest), so a
            kernel-side top_p could not promise the sampler's own distribution. With top_p < 1 the ratios compare
            the sampler's truncated distribution with this op's one; measure the gap (mismatch metrics) instead.

    Returns:
        (logprobs, entropy): float32 tensors shaped like `targets`; differentiable w.r.t. hidden, weight
        and bias through both outputs. Under a caller's torch.autocast the op computes exactly as outside it
        (autocast is off inside it, forward and backward); hidden and weight must still share a dtype.
    """
    name = backends.resolve(
        backend, hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    )
    if top_k is not None:
        name = _top_k_backend(name, backend, process_group)
    shard = vocab_parallel.setup(process_group, weight, hidden, vocab_start, reduce_hidden_grad, name)
    vocab_parallel.checked(
        shard,
        lambda: check_linear_inputs(
            hidden,
            weight,
            targets,
            bias,
            temperature,
            ignore_index,
            check_inputs,
            softcap=softcap,
            logit_scale=logit_scale,
            vocab=None if shard is None else shard.vocab,
            top_k=top_k,
        ),
    )
    zmap = backends.LogitMap(
        float(temperature), float(logit_scale), None if softcap is None else float(softcap), top_k
    )
    if name == "reference":
        logp, ent = reference_logprobs(
            hidden,
            weight,
            targets,
            bias,
            zmap.temperature,
            ignore_index,
            softcap=zmap.softcap,
            logit_scale=zmap.logit_scale,
            top_k=top_k,
        )
        return logp.float(), (ent.float() if return_entropy else None)
    x, y, index = compact_rows(hidden, targets, ignore_index)
    n = targets.numel()
    if shard is not None:
        y = vocab_parallel.local_targets(y, shard, weight.shape[0])
    logp_c, ent_c = _LinearLogprobs.apply(x, weight, bias, y, zmap, backends.ops(name), chunk_size, shard)
    logp = scatter_rows(logp_c, index, n, targets.shape)
    ent = scatter_rows(ent_c, index, n, targets.shape) if return_entropy else None
    return logp, ent
