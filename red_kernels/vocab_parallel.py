"""Vocabulary-parallel ops: the lm_head weight sharded by vocabulary rows across the ranks of a process group.

Rank r holds weight[V_r, H] (and bias[V_r]), the contiguous slice [start_r, start_r + V_r) of the vocabulary, in
rank order; hidden states and (global) targets are the same on every rank. Per token, each rank computes its
shard's shifted statistics (m_r, s_r = Σ e^{z−m_r}, t_r = Σ e^{z−m_r}(z − m_r), z_y where y is local); then

    M = max_r m_r                         (all-reduce MAX of [N] fp32)
    s = Σ_r e^{m_r−M}·s_r,   t = Σ_r e^{m_r−M}·(t_r + (m_r − M)·s_r),   z_y = Σ_r z_y,r     (one all-reduce SUM of
                                                                                         [3, N] fp32)

which are exactly the single-process statistics (the same merge as the Triton forward's vocabulary splits).
The backward uses the merged stats on the local columns: dW, db stay local to the shard; dX is a partial sum that
is all-reduced (the "reduce" a Megatron `copy_to_tensor_parallel_region` would otherwise do in backward) unless
the caller's framework already does it. Communication per call: 16·N bytes forward (+ one [world, 4] int64
gather of the shard layout, and with check_inputs one int64 all-reduce so that an input error on any rank raises
on every rank), 4·N·H bytes for dX; the weight is never gathered. The op assumes every rank of the group calls it
with the same hidden/targets (checked: row count) and its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    group: object
    start: int  # first global vocabulary id of this rank's weight rows
    vocab: int  # global vocabulary size (Σ_r V_r)
    reduce_hidden_grad: bool


def setup(process_group, weight, hidden, vocab_start, reduce_hidden_grad, backend_name):
    """The VocabShard of a call, or None without a process group (then vocab_start must be None too)."""
    if process_group is None:
        if vocab_start is not None:
            raise ValueError(
                "vocab_start is only meaningful with process_group (a vocabulary-sharded weight)"
            )
        return None
    if backend_name == "reference":
        raise ValueError(
            "backend='reference' materialises the full logits and has no vocabulary-parallel form; "
            "use backend='torch' or 'triton' with process_group"
        )
    return shard_info(process_group, weight, hidden, vocab_start, reduce_hidden_grad)


def shard_info(process_group, weight, hidden, vocab_start, reduce_hidden_grad) -> VocabShard:
    """Learn (and check) the shard layout with one tiny all-gather of (V_r, H, vocab_start, rows) per rank.

    Every rank sees every rank's numbers, so a layout error raises the same ValueError on all ranks (no hang)."""
    ok = isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(hidden, torch.Tensor)
    v_r, h = (int(weight.shape[0]), int(weight.shape[1])) if ok else (-1, -1)
    rows = hidden[..., 0].numel() if ok and hidden.dim() >= 1 else -1
    mine = torch.tensor([v_r, h, -1 if vocab_start is None else int(vocab_start), rows], dtype=torch.int64)
    world = dist.get_world_size(process_group)
    dev = _comm_device(process_group, weight if ok else None)
    got = [torch.empty_like(mine, device=dev) for _ in range(world)]
    dist.all_gather(got, mine.to(dev), group=process_group)
    table = torch.stack(got).cpu().tolist()
    rank = dist.get_rank(process_group)
    sizes = [t[0] for t in table]
    if min(sizes) < 1:
        raise ValueError(f"every rank needs a weight shard [V_r ≥ 1, H]; shard rows by rank: {sizes}")
    if len({t[1] for t in table}) > 1:
        raise ValueError(f"weight shards must share H (weight.shape[1]); by rank: {[t[1] for t in table]}")
    if len({t[3] for t in table}) > 1:
        raise ValueError(
            "hidden (and targets) must be the same on every rank of process_group; token rows by "
            f"rank: {[t[3] for t in table]}"
        )
    starts = [sum(sizes[:r]) for r in range(world)]
    given = [t[2] for t in table]
    if any(g != -1 for g in given) and given != starts:
        raise ValueError(
            f"vocab_start by rank {given} does not match the shard sizes {sizes}: the shards must be "
            f"contiguous slices of the vocabulary in rank order (vocab_start = {starts})"
        )
    return VocabShard(process_group, starts[rank], sum(sizes), bool(reduce_hidden_grad))


def checked(shard, check):
    """Run the input checks `check()`; with a shard, every rank learns whether any rank's checks failed (one
    int64 all-reduce) and raises too, so no rank is left waiting in a collective (e.g. NaN in one rank's shard)."""
    if shard is None:
        return check()
    error = None
    try:
        check()
    except (TypeError, ValueError) as e:
        error = e
    flag = torch.tensor([0 if error is None else 1 + dist.get_rank(shard.group)], dtype=torch.int64)
    flag = _all_reduce(flag.to(_comm_device(shard.group, None)), dist.ReduceOp.MAX, shard.group)
    if error is not None:
        raise error
    if int(flag) > 0:
        raise ValueError(
            f"rank {int(flag) - 1} of process_group rejected its inputs (see the error on that "
            "rank); every rank stops so that none waits in a collective"
        )


def _comm_device(group, t):
    """gloo communicates CPU tensors; other backends (nccl) the tensors' own device."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return t.device if t is not None else torch.device("cuda", torch.cuda.current_device())


def local_targets(y, shard: VocabShard, local_vocab: int):
    """Global ids [M] → ids of this shard's rows, −1 where the target lies on another shard."""
    local = y - shard.start
    return torch.where((local >= 0) & (local < local_vocab), local, torch.full_like(local, -1))


def _all_reduce(t, op, group):
    dev = _comm_device(group, t)
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=op, group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def merge_stats(stats, y_local, shard: VocabShard):
    """Local shifted stats (m, logs, ezs, zy_s) [M] of a shard → the global ones, with two all-reduces."""
    m, logs, ezs, zy_s = stats
    if m.numel() == 0:
        return m, logs, ezs, zy_s
    big_m = _all_reduce(m.clone(), dist.ReduceOp.MAX, shard.group)
    d = m - big_m
    scale = d.exp()
    s = logs.exp()
    packed = torch.stack([scale * s, scale * (ezs * s + d * s), torch.where(y_local >= 0, zy_s + m, 0.0)])
    _all_reduce(packed, dist.ReduceOp.SUM, shard.group)
    s_all, t_all, zy = packed
    return big_m, s_all.log(), t_all / s_all, zy - big_m


def reduce_hidden_grad(dx, shard: VocabShard):
    """dX partial sums over the local vocabulary → the full dX on every rank (unless the caller reduces)."""
    if shard.reduce_hidden_grad and dx.numel():
        _all_reduce(dx, dist.ReduceOp.SUM, shard.group)
    return dx
