"""The records that flow through a step: PromptItem (a tokenised problem) and RolloutBatch (tensor-first).

A RolloutBatch holds G prompt groups of n members, rows group-major (row = g·n + j), B = G·n. Each stage reads
it and returns an extended copy (`batch.replace(...)`); nothing is mutated:

    from_rollouts / teacher_only -> rewards.score (texts, status, reward) -> algorithm (advantage,
    group_accuracy, offline_weight) -> update.old_policy_pass (old_logprobs, entropy) -> is_weights (TIS)

Token tensors are right-padded with 0: prompt [B, P], response [B, R]. Per-token tensors are response-aligned
[B, R] (column t = response token t; 0 past response_len). Per-row tensors are [B].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

STATUSES = ("correct", "wrong", "no_answer", "timeout", "gold_unparseable")  # status codes index this


@dataclass
class PromptItem:
    """A tokenised training / eval problem."""

    prompt_ids: list
    answer: str
    trace_ids: list  # list of token-id lists (each ends with EOS unless truncated)
    source: str
    row: int
    uid: int  # index in the dataset (stable across resumes)
    problem: str = ""  # the problem text (reward.fn's `prompt`)
    fields: dict = field(default_factory=dict)  # the data row's columns but the traces (reward.fn's `row`)


def _pad(rows: list, dtype) -> Tensor:
    if not rows:
        return torch.zeros(0, 1, dtype=dtype)
    return pad_sequence([torch.as_tensor(r, dtype=dtype).reshape(-1) for r in rows], batch_first=True)


@dataclass(frozen=True)
class RolloutBatch:
    items: tuple  # [G] PromptItem of each group
    n: int  # members per group
    prompt: Tensor  # [B, P] long
    prompt_len: Tensor  # [B] long
    response: Tensor  # [B, R] long
    response_len: Tensor  # [B] long, >= 1
    is_offline: Tensor  # [B] bool: teacher trace (an explicit flag, never a position)
    truncated: Tensor  # [B] bool: stopped by max_new_tokens
    engine_logprobs: Tensor | None = None  # [B, R] engine log-prob of each sampled token (online rows)
    texts: tuple = ()  # [B] decoded responses                      (rewards.score)
    status: Tensor | None = None  # [B] long, index into STATUSES               (rewards.score)
    reward: Tensor | None = None  # [B] float32                                 (rewards.score)
    advantage: Tensor | None = None  # [B] float32, w applied by the loss, not here (algorithm)
    group_accuracy: Tensor | None = None  # [B] r̄ of the row's group               (algorithm)
    offline_weight: Tensor | None = None  # [B] w                                    (algorithm)
    old_logprobs: Tensor | None = None  # [B, R] float32                            (update.old_policy_pass)
    entropy: Tensor | None = None  # [B, R] float32                            (update.old_policy_pass)
    is_weights: Tensor | None = None  # [B, R] truncated IS weights, 1 off-mask   (rollout.mismatch)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_rollouts(cls, items, rollouts, k: int) -> RolloutBatch:
        """One group per prompt: its online rollouts (engine order), then k teacher traces (cycling)."""
        prompts, resp, off, trunc, lps = [], [], [], [], []
        for it, ros in zip(items, rollouts):
            if k and not it.trace_ids:
                raise ValueError(f"problem at row {it.row} has no teacher trace but the mode needs {k}")
            members = [(ro.token_ids, False, ro.finish_reason == "length", ro.logprobs) for ro in ros]
            members += [(it.trace_ids[j % len(it.trace_ids)], True, False, None) for j in range(k)]
            for ids, is_off, tr, lp in members:
                prompts.append(it.prompt_ids)
                resp.append(ids)
                off.append(is_off)
                trunc.append(tr)
                lps.append(lp if lp is not None else [0.0] * len(ids))
        n = len(rollouts[0]) + k if rollouts else k
        has_lp = any(ro.logprobs is not None for ros in rollouts for ro in ros)
        return cls(
            tuple(items),
            n,
            _pad(prompts, torch.long),
            torch.tensor([len(p) for p in prompts]),
            _pad(resp, torch.long),
            torch.tensor([len(r) for r in resp]),
            torch.tensor(off, dtype=torch.bool),
            torch.tensor(trunc, dtype=torch.bool),
            _pad(lps, torch.float32) if has_lp else None,
        )

    @classmethod
    def teacher_only(cls, items, k: int) -> RolloutBatch:
        """SFT: k teacher traces of every prompt that has one, as groups of k offline members."""
        return cls.from_rollouts(
            [it for it in items if it.trace_ids], [[] for it in items if it.trace_ids], k
        )

    @classmethod
    def cat(cls, batches: list) -> RolloutBatch:
        """Groups of several batches (same n), in order; an optional field missing in some batches is filled
        there (0; is_weights 1) — e.g. teacher-only groups have no engine log-probs."""
        batches = [b for b in batches if b.G] or batches[:1]
        out = {
            "items": sum((b.items for b in batches), ()),
            "n": batches[0].n,
            "texts": sum((b.texts for b in batches), ()),
        }
        for f in dataclasses.fields(cls):
            vals = [getattr(b, f.name) for b in batches]
            if f.name in out or all(v is None for v in vals):
                continue
            ref = next(v for v in vals if v is not None)
            vals = [
                torch.full((b.B, *ref.shape[1:2]), 1.0 if f.name == "is_weights" else 0.0, dtype=ref.dtype)
                if v is None
                else v
                for v, b in zip(vals, batches)
            ]
            if ref.dim() == 2:
                width = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in vals]
            out[f.name] = torch.cat(vals)
        return cls(**out)

    # ------------------------------------------------------------------ views
    def replace(self, **fields) -> RolloutBatch:
        return dataclasses.replace(self, **fields)

    @property
    def B(self) -> int:
        return int(self.response_len.numel())

    @property
    def G(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> Tensor:
        """[B] prompt + response tokens."""
        return self.prompt_len + self.response_len

    @property
    def correct(self) -> Tensor:
        return self.status == 0

    def response_mask(self) -> Tensor:
        """[B, R] bool, true on response tokens."""
        return torch.arange(self.response.shape[1])[None] < self.response_len[:, None]

    def grouped(self, t: Tensor) -> Tensor:
        """[B, ...] -> [G, n, ...]."""
        return t.reshape(self.G, self.n, *t.shape[1:])

    def select_groups(self, keep) -> RolloutBatch:
        """The groups where `keep` [G] (bool mask or indices) selects, in order."""
        keep = torch.as_tensor(keep)
        idx = torch.arange(self.G)[keep if keep.dtype == torch.bool else keep.long()]
        rows = (idx[:, None] * self.n + torch.arange(self.n)[None]).reshape(-1)
        out = {
            "items": tuple(self.items[i] for i in idx.tolist()),
            "texts": tuple(self.texts[i] for i in rows.tolist()) if self.texts else (),
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[rows]
        return self.replace(**out)
