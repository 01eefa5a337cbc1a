"""RolloutBatch -> micro-batches: token budgets, target alignment, per-token values placed on response
positions and read back (red/batching.py, red/records.py)."""

import torch

from red.batching import IGNORE, collate, token_budget_groups
from red.packing import micro_batches
from red.records import PromptItem, RolloutBatch
from red.rollout.base import Rollout


def make_batch(n=6, seed=0) -> RolloutBatch:
    """n groups of one member each (every third a teacher trace) with advantages, r̄, w and engine log-probs."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(n):
        p = torch.randint(3, 200, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        item = PromptItem(p, "1", [r], "t", i, i)
        if i % 3 == 2:
            parts.append(RolloutBatch.from_rollouts([item], [[]], 1))
        else:
            parts.append(RolloutBatch.from_rollouts([item], [[Rollout(p, r, [-1.0] * len(r), "stop")]], 0))
    b = RolloutBatch.cat(parts)
    return b.replace(
        advantage=torch.arange(n, dtype=torch.float32) - 2.5,
        group_accuracy=0.25 + 0.1 * torch.arange(n, dtype=torch.float32),
        offline_weight=torch.full((n,), 1.5),
    )


def test_micro_batches_respect_the_token_budget():
    assert token_budget_groups([5, 3, 8, 2], 10) == [[2], [0, 1], [3]]
    assert token_budget_groups([4, 4, 4], 100) == [[0, 1, 2]]
    assert token_budget_groups([50, 1], 10) == [[0], [1]]  # a sequence over budget goes alone
    b = make_batch(7, seed=1)
    mbs = micro_batches(b, 12, pad_id=0)
    assert sorted(i for mb in mbs for i in mb.rows.tolist()) == list(range(7))
    assert all(mb.input_ids.numel() <= 12 or len(mb.rows) == 1 for mb in mbs)


def test_collate_aligns_targets_with_responses():
    items = [PromptItem([5, 6, 7], "1", [[8, 9]], "t", 0, 0), PromptItem([5], "1", [], "t", 1, 1)]
    b = RolloutBatch.cat(
        [
            RolloutBatch.from_rollouts(items[:1], [[]], 1),
            RolloutBatch.from_rollouts(items[1:], [[Rollout([5], [4], [-0.5], "stop")]], 0),
        ]
    )
    mb = collate(b.replace(old_logprobs=torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])), [0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert mb.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert mb.targets.tolist() == [[IGNORE, IGNORE, 8, 9], [4, IGNORE, IGNORE, IGNORE]]
    assert mb.offline_mask.tolist() == [[False, False, True, True], [False] * 4]
    assert mb.old_logprobs.tolist() == [[0, 0, -1.0, -2.0], [-0.5, 0, 0, 0]]
    assert b.engine_logprobs[1, 0] == -0.5 and b.is_offline.tolist() == [True, False]
    back = mb.to_response(mb.old_logprobs, 2)  # [b, L-1] -> response-aligned [b, R]
    assert back.tolist() == [[-1.0, -2.0], [-0.5, 0.0]]


def test_select_and_cat_keep_groups_whole():
    b = make_batch(5)
    s = b.select_groups(torch.tensor([True, False, True, False, True]))
    assert s.G == 3 and [it.row for it in s.items] == [0, 2, 4]
    assert torch.equal(s.advantage, b.advantage[[0, 2, 4]]) and torch.equal(
        s.is_offline, b.is_offline[[0, 2, 4]]
    )
    c = RolloutBatch.cat([s, b.select_groups([1])])
    assert c.G == 4 and c.response.shape[1] == max(
        s.response.shape[1], b.select_groups([1]).response.shape[1]
    )
