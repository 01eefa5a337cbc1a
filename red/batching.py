"""RolloutBatch -> token-budgeted micro-batches: the tensors one forward/backward of the model body needs.

A MicroBatch is a small record so the packed variant (red/packing.py, which also chooses between the layouts: several sequences per row, position_ids
restarting per sequence, per-token `sequence_ids`) replaces the padded one without touching the update. Padded
layout: b rows, L = longest prompt + response of the micro-batch, right-padded with `pad_id`; per-token tensors
are [b, L - 1] aligned with targets = input_ids[:, 1:] (position t predicts token t + 1); per-sequence tensors
are [S] with S = b (row k = sequence k) when padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .records import RolloutBatch

IGNORE = -100


@dataclass
class MicroBatch:
    rows: Tensor  # [S] the RolloutBatch row of each sequence ([0] for a dummy)
    input_ids: Tensor  # [b, L]
    # [b, L] 1 on real tokens; None when packed (masks come from position_ids); [b, 1, L, L] bool when shared
    attention_mask: Tensor | None
    position_ids: Tensor  # [b, L]
    targets: Tensor  # [b, L-1] next token on response positions, IGNORE elsewhere
    offline_mask: Tensor  # [b, L-1] bool, teacher-trace tokens
    response_start: Tensor  # [S] column of the first response target in its row
    advantages: Tensor | None = None  # [S]
    group_accuracy: Tensor | None = None  # [S]
    offline_weight: Tensor | None = None  # [S]
    old_logprobs: Tensor | None = None  # [b, L-1]
    is_weights: Tensor | None = None  # [b, L-1]
    sequence_ids: Tensor | None = (
        None  # [b, L-1] packed: sequence k's positions = k, −1 tail; None: row = seq
    )
    seq_row: Tensor | None = None  # [S] packed: the row holding each sequence; None: arange(b)
    engine_logprobs: Tensor | None = (
        None  # [b, L-1] the rollout engine's log-probs (online tokens; 0 elsewhere)
    )
    entropy: Tensor | None = None  # [b, L-1] float32 token entropies of the policy before the step (passes)
    # [b, T] column of the hidden state that predicts each target (layout "shared"); None: column t predicts t + 1,
    # and per-token tensors are [b, L-1]
    hidden_index: Tensor | None = None

    @property
    def loss_mask(self) -> Tensor:
        return self.targets != IGNORE

    def to(self, device) -> MicroBatch:
        return MicroBatch(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})

    def to_response(self, per_token: Tensor, width: int) -> Tensor:
        """[b, L-1] values on target positions -> response-aligned [S, width] (0 past the response)."""
        dev = per_token.device
        s = torch.arange(len(self.rows), device=dev)
        row = (s if self.seq_row is None else self.seq_row.to(dev))[:, None]
        cols = self.response_start.to(dev)[:, None] + torch.arange(width, device=dev)
        c = cols.clamp(max=per_token.shape[1] - 1)
        ok = self.loss_mask.to(dev)[row, c] & (cols < per_token.shape[1])
        if self.sequence_ids is not None:  # stop at the sequence's end, not the next one's targets
            ok &= self.sequence_ids.to(dev)[row, c] == s[:, None]
        return torch.where(ok, per_token[row, c], torch.zeros((), dtype=per_token.dtype, device=dev))


def token_budget_groups(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Split sequence indices into micro-batches whose padded size (count × longest) fits token_budget.

    Sequences are sorted longest first so padding is small; a sequence longer than the budget goes alone.
    Deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        out.append(cur)
    return out


def _from_response(t: Tensor, start: Tensor, width: int, fill: float) -> Tensor:
    """Response-aligned [b, R] -> [b, width] placed from column `start`, `fill` elsewhere."""
    cols = torch.arange(width)[None] - start[:, None]
    ok = (cols >= 0) & (cols < t.shape[1])
    vals = t.gather(1, cols.clamp(0, t.shape[1] - 1))
    return torch.where(ok, vals, torch.full_like(vals, fill))


def collate(batch: RolloutBatch, rows: list[int], pad_id: int) -> MicroBatch:
    """The padded micro-batch of `rows` (each row needs >= 1 response token)."""
    idx = torch.tensor(rows, dtype=torch.long)
    p, r = batch.prompt_len[idx], batch.response_len[idx]
    if bool((r == 0).any()):
        raise ValueError("a sequence without response tokens cannot be trained on")
    width = int((p + r).max())
    pos = torch.arange(width)[None].expand(len(rows), width)
    prompt, response = batch.prompt[idx], batch.response[idx]
    ids = torch.where(
        pos < p[:, None],
        prompt.gather(1, pos.clamp(max=prompt.shape[1] - 1)),
        response.gather(1, (pos - p[:, None]).clamp(0, response.shape[1] - 1)),
    )
    real = pos < (p + r)[:, None]
    ids = torch.where(real, ids, torch.full_like(ids, pad_id))
    t = pos[:, :-1]
    is_target = (t >= (p - 1)[:, None]) & (t < (p + r - 1)[:, None])
    targets = torch.where(is_target, ids[:, 1:], torch.full_like(t, IGNORE))
    start = p - 1

    def per_tok(v, fill):
        return None if v is None else _from_response(v[idx], start, width - 1, fill)

    def per_seq(v):
        return None if v is None else v[idx].float()

    return MicroBatch(
        idx,
        ids,
        real.long(),
        pos.clone(),
        targets,
        is_target & batch.is_offline[idx][:, None],
        start,
        per_seq(batch.advantage),
        per_seq(batch.group_accuracy),
        per_seq(batch.offline_weight),
        per_tok(batch.old_logprobs, 0.0),
        per_tok(batch.is_weights, 1.0),
        engine_logprobs=per_tok(batch.engine_logprobs, 0.0),
    )


def dummy_micro_batch(pad_id: int) -> MicroBatch:
    """One pad token followed by one ignored target: zero loss and zero gradient. Lets a rank with nothing to
    train on take part in the collectives of a step (DDP gradient sync, FSDP2 all-gathers). `rows` is empty:
    it stands for no row of the batch."""
    z = torch.zeros(1, dtype=torch.long)
    return MicroBatch(
        torch.zeros(0, dtype=torch.long),
        torch.full((1, 2), pad_id),
        torch.ones(1, 2, dtype=torch.long),
        torch.arange(2)[None],
        torch.full((1, 1), IGNORE),
        torch.zeros(1, 1, dtype=torch.bool),
        z,
        torch.zeros(1),
        torch.full((1,), 0.5),
        torch.ones(1),
        torch.zeros(1, 1),
        torch.ones(1, 1),
    )
