"""Gradient-free sequences: red_kernels.policy_loss.gradient_free says which sequences send no gradient (A = 0 and
no other loss term on them); the step's plan puts them in its frozen part (red/plan.py) and the update runs that
part without autograd (red/update.py). Checked: a flagged sequence's gradient through red_loss is exactly zero; the
plan holds every row once, the flagged ones frozen; an update with a frozen part gives the same loss, metrics and
gradients as one that backpropagates through every sequence, and runs the frozen sequences with grad disabled."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packing import _loss_config, moved_policy_batch, policy
from test_prompt_sharing import grouped_batch
from test_update import _Recorder

import red_kernels
from red.plan import Plan
from red.update import update
from red_kernels import REDLossConfig, red_loss
from red_kernels.policy_loss import gradient_free


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sft=st.sampled_from([0.0, 0.3]),
    ent=st.sampled_from([0.0, 0.01]),
    kl=st.sampled_from([0.0, 0.05]),
    moved=st.booleans(),
    shaping=st.sampled_from(["accuracy_shift", "luffy", "none"]),
    agg=st.sampled_from(["seq_sum_const", "token_mean", "seq_mean"]),
)
def test_flagged_sequences_send_exactly_no_gradient(seed, sft, ent, kl, moved, shaping, agg):
    B, T, H, V = 7, 6, 5, 13
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    loss_mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[torch.rand(B, generator=g) < 0.5] = 0.0
    offline = torch.rand(B, generator=g) < 0.3
    cfg = REDLossConfig(sft_coef=sft, entropy_coef=ent, kl_coef=kl, offline_shaping=shaping, loss_agg=agg)
    side = {"ref_logprobs": -3 + torch.randn(B, T, generator=g, dtype=torch.float64)} if kl else {}
    if moved:  # ratios far from 1: clipping active on some tokens
        side["old_logprobs"] = -3 + 2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    out = red_loss(
        hidden,
        weight,
        targets,
        adv,
        loss_mask=loss_mask,
        offline_mask=loss_mask & offline[:, None],
        group_accuracy=torch.rand(B, generator=g, dtype=torch.float64),
        offline_weight=1 + torch.rand(B, generator=g, dtype=torch.float64),
        config=cfg,
        **side,
    )
    out.loss.backward()
    free = gradient_free(adv, offline, cfg)
    assert torch.equal(hidden.grad[free], torch.zeros_like(hidden.grad[free]))
    if ent or kl:
        assert not free.any()  # a term on every token: nothing is free
    else:
        assert torch.equal(free, (adv == 0) & ~(offline & bool(sft)))
    if not moved:  # ρ ≡ 1, inside the clip range: every other sequence does send a gradient
        sent = hidden.grad.abs().sum((1, 2)) > 0
        assert torch.equal(sent, ~free)


def _some_free(b):
    """b with zero advantages on some online and some offline rows, and the mask of those rows."""
    adv = b.advantage.clone()
    zero = torch.zeros(b.B, dtype=torch.bool)
    zero[::3] = True
    adv[zero] = 0.0
    return b.replace(advantage=adv), zero


@pytest.mark.parametrize("layout", ["off", "rows", "shared"])
@pytest.mark.parametrize("split", [False, True])
def test_the_plan_freezes_exactly_the_flagged_rows(layout, split):
    b, free = _some_free(grouped_batch(4, 5, 1, seed=2))
    assert (free & b.is_offline).any() and (free & ~b.is_offline).any()
    plan = Plan.build(b, 40, 0, layout, split=split, gradient_free=free)
    rows = [
        sorted(r for mb in part for r in mb.rows.tolist()) for part in (plan.frozen, plan.first, plan.second)
    ]
    assert rows[0] == torch.nonzero(free).flatten().tolist()
    assert sorted(rows[0] + rows[1] + rows[2]) == list(range(b.B))
    if split:
        assert not b.is_offline[rows[1]].any() and b.is_offline[rows[2]].all()
    else:
        assert rows[2] == []
    n = plan.counts()
    plan.pad((n[0] + 2, n[1] + 1, n[2]))  # dummies at the end of each part, the parts' rows unchanged
    assert plan.counts() == (n[0] + 2, n[1] + 1, n[2])
    assert sorted(r for mb in plan.frozen for r in mb.rows.tolist() if mb.loss_mask.any()) == rows[0]


def test_a_plan_with_every_row_frozen_still_has_one_backward():
    b = grouped_batch(2, 3, 1, seed=1)
    plan = Plan.build(b, 64, 0, "off", gradient_free=torch.ones(b.B, dtype=torch.bool))
    n_frozen, n_first, n_second = plan.counts()
    assert n_frozen >= 1 and n_first == 1 and n_second == 0  # one dummy: every rank reduces its gradients
    assert not plan.first[0].loss_mask.any()


@pytest.mark.parametrize("layout", ["off", "shared"])
@pytest.mark.parametrize("mode", ["red", "grpo"])
@pytest.mark.parametrize("use_old", [False, True])
def test_an_update_with_a_frozen_part_equals_the_full_backward(tiny, monkeypatch, layout, mode, use_old):
    model, tok = tiny
    # old log-probs of a moved policy (used with use_old: ratios != 1, clipping active) and TIS weights, laid out
    # by the plan
    b, _ = moved_policy_batch(model, tok, grouped_batch(4, 5, 1, seed=6), "seq_sum_const")
    b, _ = _some_free(b)
    cfg = _loss_config(mode, "seq_sum_const")
    free = gradient_free(b.advantage, b.is_offline, cfg)
    assert free.any() and not free.all()
    grad_enabled = []
    real = red_kernels.red_loss

    def recording(*a, **k):
        grad_enabled.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(red_kernels, "red_loss", recording)
    runs = []
    for mask in (None, free):
        rec = _Recorder(model.parameters())
        plan = Plan.build(b, 48, tok.pad_token_id, layout, gradient_free=mask)
        plan.set_sequences(
            advantages=b.advantage, group_accuracy=b.group_accuracy, offline_weight=b.offline_weight
        )
        grad_enabled.clear()
        m = update(policy(model, tok, layout), plan, cfg, rec, 1e9, b.B, use_old=use_old)
        runs.append((m, rec.grads, list(grad_enabled), plan))
    (m1, g1, e1, _), (m2, g2, e2, plan) = runs
    assert all(e1) and e2 == [False] * plan.n_frozen + [True] * (len(e2) - plan.n_frozen)
    assert plan.n_frozen >= 1
    assert m1["loss"] != 0.0
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    for a, c in zip(g1, g2):
        assert torch.allclose(c, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
