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

Layout "shared" (prompt sharing, SDPA/eager): the members of a group share one prompt, so it is run once per
chunk instead of once per member. A chunk is `prompt response_1 response_2 ...` (a group's members that fit a
row together; a larger group takes several chunks, each with its prompt); chunks are packed into rows like the
sequences of layout "rows", and a row is at most `row_tokens` wide (dense masked attention costs its width
squared: red.attention.shared_row_tokens).
Positions are those of the padded sequences (response_j continues at the prompt's length), and an explicit
attention mask [b, 1, L, L] (bool, True = attend) lets a token see its chunk's prompt and its own response, never
another member's. The hidden state that predicts response token t of a member is at column `hidden_index` of its
row: the prompt's last token for t = 0, the member's token t − 1 after that; per-token tensors are then [b, T]
with T the most response tokens of a row, each sequence's targets contiguous (IGNORE / −1 after them). Same
log-probs, loss and gradients as the other layouts (the prompt's gradient is the sum of what each member sends
back), for the prompt tokens of a group counted once: at a group of 8 with prompts as long as responses, 9
tokens run where 16 did.
"""

from __future__ import annotations

import torch

from .batching import IGNORE, MicroBatch, collate, token_budget_groups
from .records import RolloutBatch

LAYOUTS = ("off", "rows", "flat", "shared")


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


def shared_groups(
    prompts: list[tuple], lengths: list[int], token_budget: int, row_tokens: int | None = None
) -> list[list[list[list[int]]]]:
    """Micro-batches -> rows -> chunks -> sequence indices for layout "shared". Sequences with equal prompts
    (`prompts`, token tuples; `lengths` prompt + response) form chunks of at most min(token_budget, row_tokens)
    tokens counting the prompt once (first-fit, longest response first; a response that does not fit beside its
    prompt gets a chunk of its own); the chunks are then packed like the sequences of layout "rows"
    (`packed_groups`): rows as wide as a micro-batch's widest chunk, rows × width <= token_budget. `row_tokens`
    bounds a row because masked attention over a row costs its width squared (red.attention.shared_row_tokens).
    Deterministic for the same inputs."""
    cap = token_budget if row_tokens is None else max(min(token_budget, row_tokens), 1)
    by_prompt: dict[tuple, list[int]] = {}
    for i, key in enumerate(prompts):
        by_prompt.setdefault(key, []).append(i)
    chunks, cost = [], []
    for key, members in by_prompt.items():
        resp = [lengths[i] - len(key) for i in members]
        for part in first_fit_rows(resp, max(cap - len(key), 1)):
            chunks.append([members[j] for j in part])
            cost.append(len(key) + sum(resp[j] for j in part))
    return [[[chunks[c] for c in row] for row in mb] for mb in packed_groups(cost, token_budget, "rows")]


def groups(
    lengths: list[int],
    token_budget: int,
    layout: str = "off",
    prompts: list[tuple] | None = None,
    row_tokens: int | None = None,
) -> list:
    """The one planner: micro-batches -> rows -> sequence indices for `layout` ("off": padded, one sequence per
    row, red/batching.py; "rows" / "flat": packed, `packed_groups`); for "shared", micro-batches -> rows ->
    chunks -> sequence indices (`shared_groups`, which needs each sequence's prompt tokens in `prompts` and
    takes the row bound `row_tokens`). Deterministic for the same inputs."""
    if layout == "off":
        return [[[i] for i in mb] for mb in token_budget_groups(lengths, token_budget)]
    if layout == "shared":
        if prompts is None:
            raise ValueError("layout 'shared' groups sequences by prompt: pass prompts=[prompt token tuples]")
        return shared_groups(prompts, lengths, token_budget, row_tokens)
    return packed_groups(lengths, token_budget, layout)


def prompt_keys(batch: RolloutBatch, rows: list[int]) -> list[tuple]:
    """The prompt tokens of each of `rows`, as tuples (the key layout "shared" groups sequences by)."""
    return [tuple(batch.prompt[i, : int(batch.prompt_len[i])].tolist()) for i in rows]


def plan_rows(
    batch: RolloutBatch, rows: list[int], token_budget: int, layout: str, row_tokens: int | None = None
) -> list:
    """`groups` of the batch rows `rows`, its leaves mapped to batch rows."""
    if not rows:
        return []
    keys = prompt_keys(batch, rows) if layout == "shared" else None

    def to_rows(node):
        return rows[node] if isinstance(node, int) else [to_rows(x) for x in node]

    return to_rows(groups(batch.lengths[rows].tolist(), token_budget, layout, keys, row_tokens))


def micro_batch_count(lengths: list[int], token_budget: int, layout: str = "off") -> int:
    """How many micro-batches `groups` makes of sequences with these lengths (layouts without prompts)."""
    return len(groups(lengths, token_budget, layout))


def collate_layout(
    batch: RolloutBatch, rows: list[list[int]], pad_id: int, layout: str = "off"
) -> MicroBatch:
    """The MicroBatch of one planned micro-batch (rows, or chunks for "shared", of batch rows) in `layout`."""
    if layout == "off":
        return collate(batch, [i for row in rows for i in row], pad_id)
    if layout == "shared":
        return collate_shared(batch, rows, pad_id)
    return collate_packed(batch, rows, pad_id)


def micro_batches(
    batch: RolloutBatch, token_budget: int, pad_id: int, packing: str = "off", row_tokens: int | None = None
) -> list[MicroBatch]:
    """The whole batch as token-budgeted micro-batches (longest first), padded or packed. (The trainer's step
    builds them once, as a red/plan.py Plan.)"""
    return [
        collate_layout(batch, mb, pad_id, packing)
        for mb in plan_rows(batch, list(range(batch.B)), token_budget, packing, row_tokens)
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

    col = t - start[s]
    return _packed_micro_batch(batch, idx, ids, None, pos, targets, sid, is_target, col, start, seq_row)


def _shared_row(batch: RolloutBatch, chunks: list[list[int]], k0: int) -> dict:
    """One row of layout "shared": the chunks laid out `prompt response_1 ... response_k` one after the other,
    its sequences numbered from k0. Row-local tensors: ids, pos, see [n, n] (may attend), hidden_index,
    targets, sid (the sequence of each target), start (each sequence's first target)."""
    p_len = [int(batch.prompt_len[c[0]]) for c in chunks]
    r_len = [int(batch.response_len[i]) for c in chunks for i in c]
    n, n_t = sum(p_len) + sum(r_len), sum(r_len)
    ids, pos = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    chunk_of, member = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)  # member −1: prompt
    hidden_index, targets, sid = (torch.empty(n_t, dtype=torch.long) for _ in range(3))
    start = []
    o = t = 0
    k = k0
    for c, (chunk, p) in enumerate(zip(chunks, p_len)):
        prompt = batch.prompt[chunk[0], :p]
        ids[o : o + p], pos[o : o + p], chunk_of[o : o + p], member[o : o + p] = (
            prompt,
            torch.arange(p),
            c,
            -1,
        )
        last, o = o + p - 1, o + p
        for i in chunk:
            if int(batch.prompt_len[i]) != p or not torch.equal(batch.prompt[i, :p], prompt):
                raise ValueError(f"rows {chunk[0]} and {i} share a chunk but not a prompt")
            m = int(batch.response_len[i])
            resp = batch.response[i, :m]
            ids[o : o + m], pos[o : o + m], chunk_of[o : o + m], member[o : o + m] = (
                resp,
                p + torch.arange(m),
                c,
                k,
            )
            hidden_index[t] = last
            hidden_index[t + 1 : t + m] = torch.arange(o, o + m - 1)
            targets[t : t + m], sid[t : t + m] = resp, k
            start.append(t)
            o, t, k = o + m, t + m, k + 1
    col = torch.arange(n)
    see = (chunk_of[:, None] == chunk_of[None]) & (col[None] <= col[:, None])
    see &= (member[None] == -1) | (member[None] == member[:, None])
    return dict(ids=ids, pos=pos, see=see, hidden_index=hidden_index, targets=targets, sid=sid, start=start)


def collate_shared(batch: RolloutBatch, rows: list[list[list[int]]], pad_id: int = 0) -> MicroBatch:
    """The prompt-sharing MicroBatch (layout "shared", module docstring) of `rows`: each row a list of chunks,
    each chunk a list of batch rows with equal prompts. Rows are right-padded with `pad_id` to the widest (a pad
    token attends to itself only) and their targets with IGNORE (sequence id −1)."""
    seqs = [i for row in rows for chunk in row for i in chunk]
    idx = torch.tensor(seqs, dtype=torch.long)
    if bool((batch.response_len[idx] == 0).any()):
        raise ValueError("a sequence without response tokens cannot be trained on")
    built, k = [], 0
    for row in rows:
        built.append(_shared_row(batch, row, k))
        k += sum(len(chunk) for chunk in row)
    b = len(rows)
    width = max(len(r["ids"]) for r in built)
    n_t = max(len(r["targets"]) for r in built)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.arange(width).repeat(b, 1)
    see = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1, 1)
    hidden_index = torch.zeros(b, n_t, dtype=torch.long)
    targets = torch.full((b, n_t), IGNORE, dtype=torch.long)
    sid = torch.full((b, n_t), -1, dtype=torch.long)
    seq_row, start = [], []
    for j, r in enumerate(built):
        n, m = len(r["ids"]), len(r["targets"])
        ids[j, :n], pos[j, :n], see[j, 0, :n, :n] = r["ids"], r["pos"], r["see"]
        hidden_index[j, :m], targets[j, :m], sid[j, :m] = r["hidden_index"], r["targets"], r["sid"]
        seq_row += [j] * len(r["start"])
        start += r["start"]
    col = torch.arange(n_t)[None] - torch.tensor(start)[sid.clamp(min=0)]  # response column of each target

    return _packed_micro_batch(
        batch,
        idx,
        ids,
        see,
        pos,
        targets,
        sid,
        sid >= 0,
        col,
        torch.tensor(start, dtype=torch.long),
        torch.tensor(seq_row, dtype=torch.long),
        hidden_index,
    )


def _packed_micro_batch(
    batch, idx, ids, mask, pos, targets, sid, is_target, col, start, seq_row, hidden_index=None
) -> MicroBatch:
    """The MicroBatch of a packed layout from its token layout: `sid` [b, T'] the sequence of each slot (−1:
    none), `is_target` [b, T'] the slots that hold a response target, `col` [b, T'] the response column there;
    the batch's per-token values placed on the targets (fill elsewhere), its per-sequence values taken for `idx`."""
    s = sid.clamp(min=0)

    def per_tok(v, fill):  # response-aligned [B, R] -> [b, T']
        if v is None:
            return None
        vals = v[idx][s, col.clamp(0, v.shape[1] - 1)]
        return torch.where(is_target, vals, torch.full_like(vals, fill))

    def per_seq(v):
        return None if v is None else v[idx].float()

    return MicroBatch(
        idx,
        ids,
        mask,
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
        hidden_index=hidden_index,
    )
