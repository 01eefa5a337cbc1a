"""RED algorithm steps pinned to hand-computed values (red/algorithm.py; the overlong penalty of red/rewards.py)."""

import math

import pytest
import torch

from red.algorithm import (
    EntropyRatioWeight,
    group_accuracy,
    group_advantages,
    keep_groups,
    refill,
    sample_mean_entropy,
)
from red.records import PromptItem, RolloutBatch
from red.rewards import overlong_penalty
from red.rollout.base import Rollout

SQRT3 = math.sqrt(1 / 3)  # unbiased std of {1, 0, 0, 1} and of {1, 0, 0}


def test_group_layout_flags_last_k_members():
    """Each group: its online rollouts in engine order, then k teacher traces (cycling), flagged is_offline."""

    def item(r):
        return PromptItem([1, 2], "1", [[7, 8], [9]], "s", r, r)

    def ros():
        return [Rollout([1, 2], [3], None, "stop"), Rollout([1, 2], [4, 4], None, "length")]

    b = RolloutBatch.from_rollouts([item(0), item(1)], [ros(), ros()], 3)
    assert b.n == 5 and b.B == 10
    assert b.grouped(b.is_offline).tolist() == [[False, False, True, True, True]] * 2
    assert b.response[2:5].tolist() == [[7, 8], [9, 0], [7, 8]] and b.truncated[:5].tolist() == [
        0,
        1,
        0,
        0,
        0,
    ]
    assert RolloutBatch.from_rollouts([item(0)], [ros()], 0).is_offline.tolist() == [False, False]
    with pytest.raises(ValueError, match="no teacher trace"):
        RolloutBatch.from_rollouts([PromptItem([1], "1", [], "s", 4, 4)], [ros()], 1)


def test_advantages_with_offline_member_whole_group():
    # rewards 1,0,0 online + teacher 1: mean 0.5, unbiased std sqrt(1/3)
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    off = torch.tensor([[False, False, False, True]])
    a = group_advantages(r, off)
    expect = 0.5 / (SQRT3 + 1e-6)
    assert torch.allclose(a, torch.tensor([[expect, -expect, -expect, expect]]), atol=1e-6)


def test_advantages_without_offline_member():
    # the same online samples without the teacher (GRPO): mean 1/3, unbiased std sqrt(1/3)
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3, dtype=torch.bool))
    hi, lo = (2 / 3) / (SQRT3 + 1e-6), (-1 / 3) / (SQRT3 + 1e-6)
    assert torch.allclose(a, torch.tensor([[hi, lo, lo]]), atol=1e-6)


def test_advantages_online_stats_apply_to_teacher():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    off = torch.tensor([[False, False, False, True]])
    a = group_advantages(r, off, adv_stats="online")
    hi, lo = (2 / 3) / (SQRT3 + 1e-6), (-1 / 3) / (SQRT3 + 1e-6)
    assert torch.allclose(a, torch.tensor([[hi, lo, lo, hi]]), atol=1e-6)


def test_advantages_mean_centring_only_and_zero_variance_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    off = torch.tensor([[False, False, False, True]] * 2)
    a = group_advantages(r, off, adv_std=False)
    assert a.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    assert group_advantages(r, off)[1].tolist() == [0.0] * 4  # 0 / (0 + eps), never NaN


def test_group_accuracy_includes_teacher():
    acc = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert group_accuracy(acc).tolist() == [0.5, 0.25]


def test_keep_groups_drops_zero_variance():
    acc = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
    keep, why = keep_groups(acc)
    assert keep.tolist() == [False, True, False]
    assert why == {"all_correct": 1, "all_wrong": 1}


def _draws():
    draws = [
        (["A", "B", "C"], torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])),
        (["D", "E", "F"], torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])),
        (["G", "H", "I"], torch.tensor([[0, 1, 1, 1]] * 3)),
    ]
    calls = []

    def draw(attempt, need):
        calls.append((attempt, need))
        return draws[attempt]

    return draw, calls


def _kept(parts):
    """The kept groups of refill's (groups, keep mask) parts, in order."""
    return [g for groups, keep in parts for g, k in zip(groups, keep.tolist()) if k]


def test_dynamic_sampling_refills_until_full():
    draw, calls = _draws()
    parts, st = refill(draw, target=3, max_refill=5)
    assert _kept(parts) == ["B", "D", "F"] and calls == [(0, 3), (1, 2)]
    assert st == {"draws": 2, "dropped_all_correct": 2, "dropped_all_wrong": 1, "kept": 3, "short": 0}


def test_dynamic_sampling_stops_after_max_refill_and_truncates():
    draw, calls = _draws()
    parts, st = refill(draw, target=3, max_refill=0)
    assert _kept(parts) == ["B"] and st["short"] == 2 and calls == [(0, 3)]
    draw, _ = _draws()
    parts, st = refill(draw, target=2, max_refill=5)
    assert _kept(parts) == ["B", "D"] and st["draws"] == 2


def test_dynamic_sampling_disabled_keeps_first_draw():
    draw, calls = _draws()
    parts, st = refill(draw, target=3, max_refill=5, enabled=False)
    assert _kept(parts) == ["A", "B", "C"] and calls == [(0, 3)] and st["dropped_all_correct"] == 0


def test_refill_need_more_hook_forces_lockstep_draws():
    draw, calls = _draws()
    parts, st = refill(draw, target=1, max_refill=2, need_more=lambda short: True)  # another rank is short
    assert [a for a, _ in calls] == [0, 1, 2] and _kept(parts) == ["B"]


def test_entropy_ratio_weight_three_steps_with_zero_denominator():
    w = EntropyRatioWeight(w_min=1.0, w_max=7.0)
    assert w.update(2.0, 1.0) == (1.0, 1.0)  # first step
    wv, raw = w.update(1.5, 1.2)  # (1 - 1.2/1.0) / (1 - 1.5/2.0) = -0.8
    assert raw == pytest.approx(-0.8) and wv == 1.0  # |-0.8| clipped up to w_min
    wv, raw = w.update(1.5, 0.6)  # H_on unchanged: zero denominator
    assert raw == math.inf and wv == 7.0
    wv, raw = w.update(1.2, 0.3)  # (1 - 0.5) / (1 - 0.8) = 2.5
    assert raw == pytest.approx(2.5) and wv == pytest.approx(2.5)


def test_entropy_ratio_weight_eps_guard_clip_and_fixed():
    w = EntropyRatioWeight(w_min=1.0, w_max=3.0, eps=1e-3)
    w.update(1.0, 1.0)
    wv, raw = w.update(1.0005, 0.5)  # |den| = 5e-4 < eps
    assert raw == math.inf and wv == 3.0
    w = EntropyRatioWeight(w_min=1.0, w_max=3.0)
    w.update(1.0, 1.0)
    assert w.update(0.9, 0.0)[0] == 3.0  # raw = 1 / 0.1 = 10 -> clipped to w_max
    f = EntropyRatioWeight(fixed=True)
    f.update(1.0, 1.0)
    assert f.update(0.9, 0.0) == (1.0, pytest.approx(10.0))


def test_entropy_ratio_weight_ema_and_state_roundtrip():
    w = EntropyRatioWeight(w_min=1.0, w_max=7.0, ema=0.5)
    w.update(2.0, 1.0)
    # smoothed: H_on = 0.5*2 + 0.5*1 = 1.5, H_off = 0.5*1 + 0.5*0.4 = 0.7 -> (1 - 0.7) / (1 - 0.75) = 1.2
    wv, raw = w.update(1.0, 0.4)
    assert raw == pytest.approx(1.2) and wv == pytest.approx(1.2)
    state = w.state_dict()
    v = EntropyRatioWeight(w_min=1.0, w_max=7.0, ema=0.5)
    v.load_state_dict(state)
    assert v.update(1.0, 0.2) == w.update(1.0, 0.2)


def test_entropy_ratio_weight_missing_side_keeps_state():
    w = EntropyRatioWeight()
    w.update(2.0, 1.0)
    assert w.update(1.0, None)[0] == 1.0
    assert w.state_dict() == {"prev_on": 2.0, "prev_off": 1.0}


def test_sample_mean_entropy():
    ent = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert sample_mean_entropy(ent, mask).tolist() == [2.0, 2.0, 0.0]  # an empty response has h = 0


def test_overlong_penalty():
    p = overlong_penalty(torch.tensor([80, 90, 100]), max_len=100, buffer=20)
    assert p.tolist() == [0.0, -0.5, -1.0]
