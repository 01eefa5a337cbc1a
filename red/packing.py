"""Packed micro-batches: several sequences concatenated in one row, no padding between them.

Layout of a packed MicroBatch (see red/batching.py for the padded one): b rows of width L, each row the
concatenation prompt_1 response_1 prompt_2 response_2 ... of some sequences, then (layout "rows" only) a short
tail of `pad_id` up to the longest row of the micro-batch. `position_ids` restart at 0 at every sequence (and at
the tail), `attention_mask` is None: transformers then derives block-diagonal causal attention from the
position_ids (masking_utils.find_packed_sequence_indices for sdpa/eager; the varlen path of flash_attention_2 /
red.attention's torch_varlen), so a sequence never attends to its neighbours and its RoPE positions are the
padded ones. Per-sequence tensors are [S] (S sequences, `rows[k]` = their batch rows), `sequence_ids` [b, L-1]
says which sequence each target position belongs to (−1 on the tail), in red_loss's convention.

Layouts:
* "flat": one row per micro-batch holding up to `token_budget` tokens (FlashAttention varlen: cost is linear in
  the row, b = 1 as transformers' padding-free path expects).
* "rows": several rows per micro-batch, as wide as its longest sequence, rows × width ≤ budget (SDPA/eager with
  a dense block mask: the attention cost of a row stays that of the padded row it replaces).
In both, a sequence longer than the budget is a micro-batch of its own, as when padded.
"""

from __future__ import annotations

import torch

from .batching import IGNORE, MicroBatch, collate, token_budget_groups
from .records import RolloutBatch

LAYOUTS = ("off", "rows", "flat")


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices packed into rows of at most `capacity` tokens, first-fit in longest-first order (a
    sequence longer than capacity gets a row of its own). Deterministic for the same lengths."""
    rows, fill = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, f in enumerate(fill) if f + lengths[i] <= capacity), None)
        if j is None:
            rows.append([i])
            fill.append(lengths[i])
        else:
            rows[j].append(i)
            fill[j] += lengths[i]
    return rows


def packed_groups(lengths: list[int], token_budget: int, layout: str) -> list[list[list[int]]]:
    """Micro-batches -> rows -> sequence indices, for `layout` "flat" or "rows" (see the module docstring).

    "rows": longest first, each sequence into the first row with room of any micro-batch; a sequence that fits
    nowhere opens a micro-batch of budget // n rows of width n (its length: the padded micro-batch it opens has
    budget // n sequences). No micro-batch is wider than padding would make it, and short sequences fill the
    rows of longer ones."""
    if not lengths:
        return []
    if layout == "flat":
        return [[row] for row in first_fit_rows(lengths, token_budget)]
    if layout != "rows":
        raise ValueError(f"packing layout must be one of flat, rows, got {layout!r}")
    out, fill, width = [], [], []  # per micro-batch: rows, row fills, width
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = next(((m, j) for m in range(len(out)) for j, f in enumerate(fill[m]) if f + n <= width[m]), None)
        if at is None:
            out.append([[] for _ in range(max(token_budget // n, 1))])
            fill.append([0] * len(out[-1]))
            width.append(n)
            at = (len(out) - 1, 0)
        out[at[0]][at[1]].append(i)
        fill[at[0]][at[1]] += n
    return [[row for row in mb if row] for mb in out]


def groups(lengths: list[int], token_budget: int, layout: str = "off") -> list[list[list[int]]]:
    """The one planner: micro-batches -> rows -> sequence indices for `layout` ("off": padded, one sequence per
    row, red/batching.py; "rows" / "flat": packed, `packed_groups`). Deterministic for the same lengths."""
    if layout == "off":
        return [[[i] for i in mb] for mb in token_budget_groups(lengths, token_budget)]
    return packed_groups(lengths, token_budget, layout)


def micro_batch_count(lengths: list[int], token_budget: int, layout: str = "off") -> int:
    """How many micro-batches `groups` makes of sequences with these lengths."""
    return len(groups(lengths, token_budget, layout))


def collate_layout(
    batch: RolloutBatch, rows: list[list[int]], pad_id: int, layout: str = "off"
) -> MicroBatch:
    """The MicroBatch of one planned micro-batch (rows of batch rows) in `layout`."""
    if layout == "off":
        return collate(batch, [i for row in rows for i in row], pad_id)
    return collate_packed(batch, rows, pad_id)


def micro_batches(
    batch: RolloutBatch, token_budget: int, pad_id: int, packing: str = "off"
) -> list[MicroBatch]:
    """The whole batch as token-budgeted micro-batches (longest first), padded or packed. (The trainer's step
    builds them once, as a red/plan.py Plan.)"""
    return [
        collate_layout(batch, mb, pad_id, packing)
        for mb in groups(batch.lengths.tolist(), token_budget, packing)
    ]


def collate_packed(batch: RolloutBatch, rows: list[list[int]], pad_id: int) -> MicroBatch:
    """The packed MicroBatch of `rows` (each a list of batch rows, concatenated in that order)."""
    seqs = [i for row in rows for i in row]
    idx = torch.tensor(seqs, dtype=torch.long)
    p, r = batch.prompt_len[idx], batch.response_len[idx]
    if bool((r == 0).any()):
        raise ValueError("a sequence without response tokens cannot be trained on")
    n = dict(zip(seqs, (p + r).tolist()))
    width = max(sum(n[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    sid = torch.full((len(rows), width), -1, dtype=torch.long)
    seq_row, offset, k = torch.empty(len(seqs), dtype=torch.long), torch.empty(len(seqs), dtype=torch.long), 0
    for j, row in enumerate(rows):
        o = 0
        for i in row:
            pi, ri = int(batch.prompt_len[i]), int(batch.response_len[i])
            ids[j, o : o + pi], ids[j, o + pi : o + pi + ri] = batch.prompt[i, :pi], batch.response[i, :ri]
            pos[j, o : o + pi + ri] = torch.arange(pi + ri)
            sid[j, o : o + pi + ri] = k
            seq_row[k], offset[k] = j, o
            o, k = o + pi + ri, k + 1
        pos[j, o:] = torch.arange(width - o)  # the tail: a block of its own, outside every sequence
    start = offset + p - 1  # [S] column of each sequence's first response target
    sid = sid[:, :-1].clone()  # [b, L-1]: the sequence whose token predicts the next
    t, s = torch.arange(width - 1)[None], sid.clamp(min=0)
    is_target = (sid >= 0) & (t >= start[s]) & (t < (start + r)[s])
    targets = torch.where(is_target, ids[:, 1:], torch.full_like(sid, IGNORE))

    def per_tok(v, fill):  # response-aligned [B, R] -> [b, L-1]
        if v is None:
            return None
        vals = v[idx][s, (t - start[s]).clamp(0, v.shape[1] - 1)]
        return torch.where(is_target, vals, torch.full_like(vals, fill))

    def per_seq(v):
        return None if v is None else v[idx].float()

    return MicroBatch(
        idx,
        ids,
        None,
        pos,
        targets,
        is_target & batch.is_offline[idx][s],
        start,
        per_seq(batch.advantage),
        per_seq(batch.group_accuracy),
        per_seq(batch.offline_weight),
        per_tok(batch.old_logprobs, 0.0),
        per_tok(batch.is_weights, 1.0),
        sequence_ids=sid,
        seq_row=seq_row,
        engine_logprobs=per_tok(batch.engine_logprobs, 0.0),
    )
