"""RED algorithm steps pinned to hand-computed values (red/algorithm.py; the overlong penalty of red/rewards.py)."""

import math

import pytest
import torch

from red.algorithm import (
    EntropyRatioWeight,
    group_accuracy,
    group_advantages,
    group_kinds,
    keep_groups,
    refill,
    sample_mean_entropy,
    teacher_only_advantages,
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
    assert why == {"all_correct": 1, "all_wrong": 1, "teacher_only": 0}


# One teacher-only group (online 0,0,0, teacher 1), one mixed group (online 1,0,0, teacher 1), one all-wrong.
TO_ACC = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
TO_OFF = torch.tensor([[False, False, False, True]] * 3)


def test_group_kinds_teacher_only_needs_online_members_all_wrong_and_a_correct_teacher():
    k = group_kinds(TO_ACC, TO_OFF)
    assert k["teacher_only"].tolist() == [True, False, False]
    assert k["all_wrong"].tolist() == [False, False, True] and k["all_correct"].tolist() == [False] * 3
    assert group_kinds(TO_ACC)["teacher_only"].tolist() == [False] * 3  # no flags (grpo): never
    only_teacher = torch.tensor([[True, True]])  # an SFT-like group without online members
    assert group_kinds(torch.tensor([[1.0, 1.0]]), only_teacher)["teacher_only"].tolist() == [False]


@pytest.mark.parametrize("choice", ["keep", "zero_online", "drop"])
def test_teacher_only_groups_hand_computed_advantages(choice):
    """Group 0 is teacher-only: rewards 0,0,0,1 -> mean 1/4, unbiased std sqrt((3/16 + 9/16) / 3) = 1/2, so
    online -0.25/0.5 = -0.5 each and the teacher 0.75/0.5 = 1.5. Group 1 (mixed) is never changed:
    mean 1/2, std sqrt(1/3) -> +-0.5/sqrt(1/3)."""
    keep, why = keep_groups(TO_ACC, TO_OFF, choice)
    assert keep.tolist() == ([False, True, False] if choice == "drop" else [True, True, False])
    assert why["teacher_only"] == (1 if choice == "drop" else 0) and why["all_wrong"] == 1
    adv = teacher_only_advantages(group_advantages(TO_ACC, TO_OFF), TO_ACC, TO_OFF, choice)
    e = 1e-6
    g0 = {
        "keep": [-0.25 / (0.5 + e)] * 3 + [0.75 / (0.5 + e)],
        "zero_online": [0.0, 0.0, 0.0, 0.75 / (0.5 + e)],
    }
    h = 0.5 / (SQRT3 + e)
    assert torch.allclose(adv[1], torch.tensor([h, -h, -h, h]), atol=1e-6)
    if choice != "drop":  # a dropped group never reaches the advantages (keep mask above)
        assert torch.allclose(adv[0], torch.tensor(g0[choice]), atol=1e-6)
    with pytest.raises(ValueError, match="teacher_only_groups must be one of"):
        teacher_only_advantages(adv, TO_ACC, TO_OFF, "zero")


def test_refill_drops_teacher_only_groups_and_refills():
    draws = [(["T", "M"], TO_ACC[:2], TO_OFF[:2]), (["M2"], TO_ACC[1:2], TO_OFF[1:2])]
    parts, st = refill(lambda a, need: draws[a], target=2, max_refill=1, teacher_only="drop")
    assert _kept(parts) == ["M", "M2"] and st["dropped_teacher_only"] == 1 and st["kept"] == 2
    parts, st = refill(lambda a, need: draws[a], target=2, max_refill=1, enabled=False, teacher_only="drop")
    assert _kept(parts) == ["M"] and st["dropped_teacher_only"] == 1
    parts, st = refill(lambda a, need: draws[a], target=2, max_refill=1, teacher_only="zero_online")
    assert _kept(parts) == ["T", "M"] and st["dropped_teacher_only"] == 0


def test_online_stats_with_zero_online_spread_fall_back_to_the_group_std():
    """adv_stats=online, online rewards all 0, teacher 1: online mean 0 and std 0 -> the whole group's std
    (1/2 for 0,0,0,1) is used: advantages 0,0,0,1/(1/2) = 2 — finite, not 1/eps. One online member (std over
    one value = 0): same rule. Every reward equal: all 0."""
    off = torch.tensor([[False, False, False, True]])
    a = group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), off, adv_stats="online")
    assert torch.allclose(a, torch.tensor([[0.0, 0.0, 0.0, 1 / (0.5 + 1e-6)]]), atol=1e-6)
    one = group_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True]]), adv_stats="online")
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert torch.allclose(one, torch.tensor([[0.0, -1 / (std + 1e-6)]]), atol=1e-6)
    same = group_advantages(torch.ones(1, 4), off, adv_stats="online")
    assert same.tolist() == [[0.0] * 4]


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
    assert st == {
        "draws": 2,
        "dropped_all_correct": 2,
        "dropped_all_wrong": 1,
        "dropped_teacher_only": 0,
        "kept": 3,
        "short": 0,
    }


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


def test_online_stats_zero_spread_through_the_fused_loss_is_finite_and_matches_float64():
    """The fused red_loss fed with adv_stats=online advantages of a teacher-only group (online std 0): the loss
    and its gradient are finite and equal the float64 reference on the same advantages (the teacher's
    advantage is 2, not 1e6)."""
    from red_kernels import red_loss
    from red_kernels.reference import naive_red_loss

    off = torch.tensor([[False, False, False, True]])
    adv = group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), off, adv_stats="online").reshape(-1)
    assert adv.abs().max() < 3
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 5, 8, 11
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g) * 0.4
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    offline = mask & off.reshape(B, 1)
    rbar = torch.full((B,), 0.25)
    out = red_loss(hidden, weight, targets, adv, loss_mask=mask, offline_mask=offline, group_accuracy=rbar)
    out.loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    ref = naive_red_loss(
        h64, weight.double(), targets, adv.double(), mask, offline=offline, r_bar=rbar.double(), r_min=1 / 8
    )
    ref.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()
    assert abs(out.loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)
