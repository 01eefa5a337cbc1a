"""The step's micro-batch plan: built once from the step's records, then filled in place by the passes.

`Plan.build` groups a RolloutBatch's rows into token-budgeted micro-batches and collates them on the device once;
every pass of the step (the old-policy pass, each PPO epoch of the update) runs over the same MicroBatch objects.
The layout is the policy's: padded (one sequence per row, red/batching.py) or packed (several per row, or a
group's prompt shared by its members: red/packing.py); packing.groups is the one planner for all. Per-token
values live in the layout from the moment they are computed: the passes write `old_logprobs` and `entropy`
([b, L-1], or [b, T] when prompts are shared; on the device) into each micro-batch, the engine's log-probs are
placed there at build time, and per-sequence inputs (advantages, r̄, w) are set with `set_sequences`.
`response` reads any of them back as response-aligned [B, R] (for metrics and tests).

The micro-batches run in three parts, in this order: `frozen`, `first`, `second`.
* `frozen`: the sequences given as `gradient_free` (every loss term identically zero:
  red_kernels.policy_loss.gradient_free). The update runs them without autograd: their log-probs, entropies
  and metrics as before, no activations kept, no backward.
* `split=True` puts the online sequences' micro-batches first (`first`) and the offline ones after (`second`):
  the update then learns H_on from its own forward of the online part (and of the frozen part) before the
  offline part needs w. Unsplit, every sequence with a gradient is in `first`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batching import MicroBatch, dummy_micro_batch
from .packing import collate_layout, plan_rows
from .records import RolloutBatch


@dataclass
class Plan:
    """batches: the micro-batches on `device`, parts frozen, first, second (dummies at the end of each part);
    n_frozen, n_first: how many belong to the frozen and the first part; width: R, the batch's response width;
    response_len: [B]."""

    batches: list[MicroBatch]
    n_first: int
    width: int
    response_len: Tensor
    pad_id: int = 0
    device: torch.device | str = "cpu"
    n_frozen: int = 0

    @classmethod
    def build(
        cls,
        batch: RolloutBatch,
        token_budget: int,
        pad_id: int,
        layout: str = "off",
        device="cpu",
        split: bool = False,
        counts: tuple[int, int, int] | None = None,
        row_tokens: int | None = None,
        gradient_free: Tensor | None = None,
    ) -> Plan:
        """The plan of `batch`, padded by `pad(counts)`: the `gradient_free` rows ([B] bool; None: none) in the
        frozen part, then the others (split: online rows first, then offline rows); row_tokens: the widest row
        of layout "shared"."""
        free = torch.zeros(batch.B, dtype=torch.bool) if gradient_free is None else gradient_free.cpu().bool()
        off = batch.is_offline.cpu().bool()
        masks = [free, ~free & ~off, ~free & off] if split else [free, ~free, torch.zeros_like(free)]
        frozen, first, second = [
            [
                collate_layout(batch, mb, pad_id, layout).to(device)
                for mb in plan_rows(
                    batch, torch.nonzero(m).flatten().tolist(), token_budget, layout, row_tokens
                )
            ]
            for m in masks
        ]
        out = cls(
            frozen + first + second,
            len(first),
            batch.response.shape[1],
            batch.response_len.clone(),
            pad_id,
            device,
            len(frozen),
        )
        return out.pad(counts or out.counts())

    def pad(self, counts: tuple[int, int, int]) -> Plan:
        """Zero-loss dummies appended to each part up to counts (frozen, first, second) — the most any rank
        has, so that every rank runs the same forwards and backwards — and at least one micro-batch with a
        backward (first or second) in all. In place."""

        def dummies(n):
            return [dummy_micro_batch(self.pad_id).to(self.device) for _ in range(max(n, 0))]

        frozen, first, second = (
            part + dummies(n - len(part)) for part, n in zip((self.frozen, self.first, self.second), counts)
        )
        if not first and not second:
            first = dummies(1)
        self.batches, self.n_frozen, self.n_first = frozen + first + second, len(frozen), len(first)
        return self

    @property
    def frozen(self) -> list[MicroBatch]:
        """The gradient-free part: run without autograd (no backward)."""
        return self.batches[: self.n_frozen]

    @property
    def first(self) -> list[MicroBatch]:
        return self.batches[self.n_frozen : self.n_frozen + self.n_first]

    @property
    def second(self) -> list[MicroBatch]:
        return self.batches[self.n_frozen + self.n_first :]

    def counts(self) -> tuple[int, int, int]:
        return self.n_frozen, self.n_first, len(self.batches) - self.n_frozen - self.n_first

    def set_sequences(self, **per_row: Tensor) -> None:
        """Per-sequence inputs from [B] tensors, e.g. set_sequences(advantages=a, offline_weight=w)."""
        for mb in self.batches:
            if len(mb.rows):
                dev = mb.input_ids.device
                for name, v in per_row.items():
                    setattr(mb, name, v[mb.rows.cpu()].float().to(dev))

    def response(self, name: str, mbs: list[MicroBatch] | None = None) -> Tensor:
        """The per-token field `name` of the micro-batches (default all) as response-aligned [B, R] float32 on
        the CPU (0 past each response and on rows no micro-batch filled)."""
        out = torch.zeros(len(self.response_len), self.width)
        for mb in self.batches if mbs is None else mbs:
            v = getattr(mb, name)
            if len(mb.rows) and v is not None:
                out[mb.rows.cpu()] = mb.to_response(v.float(), self.width).cpu()
        return out

    def sequence_means(self, name: str, mbs: list[MicroBatch] | None = None) -> tuple[Tensor, Tensor]:
        """(rows, mean over each sequence's response tokens of the per-token field `name`) of the micro-batches
        (default all), float64 on the CPU: e.g. h_i, the mean token entropy of each sample."""
        rows, means = [], []
        for mb in self.batches if mbs is None else mbs:
            v = getattr(mb, name)
            if len(mb.rows) and v is not None:
                r = mb.rows.cpu()
                s = mb.to_response(v.double(), self.width).sum(1).cpu()
                rows.append(r)
                means.append(s / self.response_len[r].clamp_min(1).double())
        if not rows:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return torch.cat(rows), torch.cat(means)
