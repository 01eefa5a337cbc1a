"""Which sequence each position of a [B, T] batch belongs to: one row per sequence (padded) or several sequences
packed into a row (`sequence_ids`).

Convention of `sequence_ids` ([B, T], or [T] when B = 1; integers):
* id k ∈ [0, S) marks the positions of sequence k; S is the length of the per-sequence inputs (advantages [S],
  group_accuracy [S], offline_weight [S]), or max id + 1 when none is given. Per-sequence input k belongs to the
  positions with id k. Ids need not be in order of position.
* The positions of one sequence form ONE contiguous run inside ONE row (a sequence never spans rows).
* Positions that belong to no sequence (padding, the unused tail of a packed row) take −1 and must be outside
  loss_mask. A sequence's prompt positions may take its id or −1 (they are outside loss_mask either way).
* Without sequence_ids, row b is sequence b (S = B): the padded layout.
"""

from __future__ import annotations

import torch


def sequence_index(sequence_ids, targets, loss_mask, per_seq: dict):
    """(ids [B, T] int64 with −1 for no sequence, S) after validating `sequence_ids` against the convention above.

    per_seq: {name: tensor or None} of the per-sequence inputs given (1-dim); they must all have length S.
    """
    b, t = targets.shape
    lengths = {name: v.shape[0] for name, v in per_seq.items() if v is not None and v.dim() == 1}
    if sequence_ids is None:
        for name, n in lengths.items():
            if n != b:
                raise ValueError(
                    f"{name} must be per sequence, shape [{b}] (one sequence per row without "
                    f"sequence_ids), got [{n}]"
                )
        return torch.arange(b, device=targets.device)[:, None].expand(b, t), b
    ids = sequence_ids
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(
            f"sequence_ids must be an integer tensor [B, T] or [T], got "
            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}"
        )
    if ids.dim() == 1 and b == 1:
        ids = ids[None]
    if tuple(ids.shape) != (b, t):
        raise ValueError(
            f"sequence_ids must be [B, T] = {(b, t)} (or [T] when B = 1), got {tuple(ids.shape)}"
        )
    ids = ids.to(device=targets.device, dtype=torch.long)
    if bool((ids < -1).any()):
        raise ValueError(
            f"sequence_ids must be ≥ 0 for positions of a sequence and −1 for padding, got {int(ids.min())}"
        )
    if bool((loss_mask & (ids < 0)).any()):
        raise ValueError(
            "loss_mask is on where sequence_ids == −1 (padding): give those positions their "
            "sequence's id or mask them out"
        )
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"the per-sequence inputs must have one length S (the number of sequences), got {lengths}"
        )
    s = next(iter(lengths.values())) if lengths else int(ids.max()) + 1 if ids.numel() else 0
    if ids.numel() and int(ids.max()) >= s:
        names = " and ".join(lengths) or "the per-sequence inputs"
        raise ValueError(
            f"sequence_ids go up to {int(ids.max())} but {names} hold S = {s} sequences: "
            "ids must be in [0, S), one per row of the per-sequence inputs"
        )
    starts = torch.ones_like(ids, dtype=torch.bool)  # a run starts at column 0 and wherever the id changes
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_ids = ids[starts & (ids >= 0)]
    runs = torch.bincount(run_ids, minlength=max(s, 1)) if run_ids.numel() else run_ids.new_zeros(1)
    if bool((runs > 1).any()):
        k = int((runs > 1).nonzero()[0])
        raise ValueError(
            f"sequence_ids are not contiguous: sequence {k} appears in {int(runs[k])} separate runs; "
            "each sequence must be one contiguous run inside one row"
        )
    return ids, s


def per_token(values, ids):
    """values [S] (per sequence) → [B, T] per position through ids (positions with id −1 get values[0]: they are
    outside loss_mask, so the value is never used)."""
    return values[ids.clamp(min=0)] if values.numel() else values.new_zeros(ids.shape)
