"""Rollout groups: n - k online samples plus k teacher traces per prompt, graded, with an explicit is_offline flag."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .algorithm import overlong_penalty
from .policy import Sequence
from .rewards import extract_boxed


@dataclass
class Member:
    seq: Sequence
    status: str = ""
    correct: bool = False
    reward: float = 0.0
    truncated: bool = False
    text: str = ""

    @property
    def is_offline(self) -> bool:
        return self.seq.is_offline

    @property
    def length(self) -> int:
        return len(self.seq.response_ids)


@dataclass
class Group:
    item: object                       # data.PromptItem
    members: list = field(default_factory=list)

    def acc(self) -> torch.Tensor:
        return torch.tensor([float(m.correct) for m in self.members])

    def rewards(self) -> torch.Tensor:
        return torch.tensor([m.reward for m in self.members], dtype=torch.float32)

    def is_offline(self) -> torch.Tensor:
        return torch.tensor([m.is_offline for m in self.members], dtype=torch.bool)


def build_groups(items, rollouts, k: int) -> list[Group]:
    """One group per prompt: its online rollouts, then k teacher traces (cycling if the item has fewer)."""
    groups = []
    for it, ros in zip(items, rollouts):
        g = Group(item=it)
        for ro in ros:
            g.members.append(Member(Sequence(list(it.prompt_ids), list(ro.token_ids), is_offline=False,
                                             engine_logprobs=ro.logprobs), truncated=ro.finish_reason == "length"))
        for j in range(k):
            if not it.trace_ids:
                raise ValueError(f"problem at row {it.row} has no teacher trace but the mode needs {k}")
            trace = it.trace_ids[j % len(it.trace_ids)]
            g.members.append(Member(Sequence(list(it.prompt_ids), list(trace), is_offline=True)))
        groups.append(g)
    return groups


def grade_groups(groups: list[Group], tokenizer, verifier, rcfg, max_new_tokens: int) -> None:
    """Fill status / correct / reward of every member: R = Acc (+ format reward if a \\boxed{} answer is
    present) (+ soft overlong penalty)."""
    members = [m for g in groups for m in g.members]
    golds = [g.item.answer for g in groups for _ in g.members]
    texts = tokenizer.batch_decode([m.seq.response_ids for m in members], skip_special_tokens=True)
    preds = [extract_boxed(t) for t in texts]
    statuses = verifier.grade_answers(golds, preds)
    lengths = torch.tensor([m.length for m in members])
    penalty = (overlong_penalty(lengths, max_new_tokens, rcfg.overlong_buffer) if rcfg.overlong_penalty
               else torch.zeros(len(members)))
    for m, t, p, st, pen in zip(members, texts, preds, statuses, penalty.tolist()):
        m.text, m.status, m.correct = t, st, st == "correct"
        m.reward = float(m.correct) + (rcfg.format_reward if p is not None else 0.0) + pen
