"""Sequences -> padded tensors, token-budgeted micro-batches, and the model passes that feed red_kernels.

The model is only run as its body (`model.base_model`: embeddings + layers + final norm); log-probs, entropies
and the loss come from red_kernels with the lm_head weight, so full-vocabulary logits are never materialised.

Shapes: B sequences, L = longest prompt + response in the (micro-)batch; per-token tensors are [B, L - 1]
aligned with targets = input_ids[:, 1:] (position t predicts token t + 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Sequence:
    """One group member: prompt + response token ids and per-sequence training inputs."""
    prompt_ids: list
    response_ids: list
    is_offline: bool = False
    engine_logprobs: list | None = None   # engine log-probs of response tokens (online samples)
    advantage: float = 0.0
    group_accuracy: float = 0.5           # r̄ of its group
    offline_weight: float = 1.0           # w (used on offline tokens only)
    is_weights: list | None = None        # truncated IS weights of response tokens (online, vLLM mismatch)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, L] right-padded
    attention_mask: torch.Tensor   # [B, L]
    targets: torch.Tensor          # [B, L-1], IGNORE outside responses
    loss_mask: torch.Tensor        # [B, L-1] bool, response tokens
    offline_mask: torch.Tensor     # [B, L-1] bool, teacher-trace tokens
    engine_logprobs: torch.Tensor  # [B, L-1], 0 where unknown
    engine_mask: torch.Tensor      # [B, L-1] bool, tokens with an engine log-prob
    advantages: torch.Tensor       # [B]
    group_accuracy: torch.Tensor   # [B]
    offline_weight: torch.Tensor   # [B]
    is_weights: torch.Tensor       # [B, L-1], 1 where not given

    def to(self, device):
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    """Right-padded tensors for a list of sequences (each needs >= 1 response token)."""
    width = max(s.length for s in seqs)
    b = len(seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    targets = torch.full((b, width - 1), IGNORE, dtype=torch.long)
    offline = torch.zeros((b, width - 1), dtype=torch.bool)
    elp = torch.zeros((b, width - 1), dtype=torch.float32)
    emask = torch.zeros((b, width - 1), dtype=torch.bool)
    isw = torch.ones((b, width - 1), dtype=torch.float32)
    for i, s in enumerate(seqs):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if r == 0:
            raise ValueError("a sequence without response tokens cannot be trained on")
        ids[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attn[i, :p + r] = 1
        targets[i, p - 1:p + r - 1] = torch.tensor(s.response_ids, dtype=torch.long)
        if s.is_offline:
            offline[i, p - 1:p + r - 1] = True
        elif s.engine_logprobs is not None:
            elp[i, p - 1:p + r - 1] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
            emask[i, p - 1:p + r - 1] = True
        if s.is_weights is not None:
            isw[i, p - 1:p + r - 1] = torch.tensor(s.is_weights, dtype=torch.float32)
    f = lambda attr: torch.tensor([getattr(s, attr) for s in seqs], dtype=torch.float32)
    return Batch(ids, attn, targets, targets != IGNORE, offline, elp, emask, f("advantage"),
                 f("group_accuracy"), f("offline_weight"), isw)


def micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
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


def lm_head(model):
    """(weight [V, H], bias [V] or None) of the output projection (tied embeddings included)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, input_ids, attention_mask):
    """Last hidden states [B, L, H] of the model body (final norm applied), no logits."""
    body = model.base_model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def old_policy_pass(model, seqs: list[Sequence], pad_id: int, token_budget: int, temperature: float,
                    device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-sequence log p_old and entropy of the response tokens ([len(response)] fp32 each), via
    red_kernels.linear_logprobs, micro-batched."""
    from red_kernels import linear_logprobs

    weight, bias = lm_head(model)
    logps: list = [None] * len(seqs)
    ents: list = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for idx in micro_batches([s.length for s in seqs], token_budget):
            mb = collate([seqs[i] for i in idx], pad_id).to(device)
            h = hidden_states(model, mb.input_ids, mb.attention_mask)[:, :-1]
            lp, ent = linear_logprobs(h, weight, mb.targets, bias=bias, temperature=temperature)
            for j, i in enumerate(idx):
                m = mb.loss_mask[j]
                logps[i], ents[i] = lp[j][m].float().cpu(), ent[j][m].float().cpu()
    finally:
        model.train(was_training)
    return logps, ents


def per_token(values: list[torch.Tensor], seqs: list[Sequence], width: int) -> torch.Tensor:
    """Scatter per-response-token values back to the [B, width-1] layout of collate()."""
    out = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (v, s) in enumerate(zip(values, seqs)):
        p = len(s.prompt_ids)
        out[i, p - 1:p - 1 + len(v)] = v
    return out
