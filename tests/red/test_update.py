"""The old-policy pass and the update (red/update.py): alignment against full logits in float64, micro-batch
gradient accumulation equal to the full batch, and no full-vocabulary logits anywhere in the trainer's passes."""

import pytest
import torch
from conftest import tiny_model
from test_batching import make_batch

from red.batching import token_budget_groups
from red.update import Policy, old_policy_pass, policy_update


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def test_old_policy_pass_matches_full_logits_in_float64(tiny):
    model, tok = tiny
    b = old_policy_pass(Policy(model, pad_id=tok.pad_token_id), make_batch(), 16, temperature=0.7)
    model64 = model.double()
    try:
        for i in range(b.B):
            p, r = int(b.prompt_len[i]), int(b.response_len[i])
            prompt, resp = b.prompt[i, :p].tolist(), b.response[i, :r].tolist()
            logits = model64(input_ids=torch.tensor([prompt + resp])).logits[0, p - 1 : -1] / 0.7
            ref = torch.log_softmax(logits, -1)
            ref_lp = ref.gather(1, torch.tensor(resp)[:, None])[:, 0]
            ref_ent = -(ref.exp() * ref).sum(-1)
            assert torch.allclose(b.old_logprobs[i, :r].double(), ref_lp, atol=1e-4)
            assert torch.allclose(b.entropy[i, :r].double(), ref_ent, atol=1e-4)
            assert not b.old_logprobs[i, r:].any()  # 0 past the response
    finally:
        model.float()


class _Recorder:
    """Optimizer stand-in: records the (clipped) gradients step() would apply."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    param_groups = [{"lr": 0.0}]


@pytest.mark.parametrize("agg", ["seq_sum_const", "token_mean", "seq_mean"])
def test_micro_batch_accumulation_equals_full_batch(tiny, agg):
    from red_kernels import REDLossConfig

    model, tok = tiny
    b = make_batch(7, seed=1)
    norm = b.B if agg != "token_mean" else int(b.response_len.sum())
    cfg = REDLossConfig(loss_agg=agg, loss_const=8.0, r_min=1 / 16)
    runs = []
    for budget in (10_000, 12):  # one micro-batch vs many
        rec = _Recorder(model.parameters())
        m = policy_update(
            Policy(model, pad_id=tok.pad_token_id), b, cfg, budget, rec, 1e9, norm, use_old=False
        )
        runs.append((m, rec.grads))
    (m1, g1), (m2, g2) = runs
    assert len(token_budget_groups(b.lengths.tolist(), 12)) > 2
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_trainer_passes_never_materialise_full_logits(tiny, monkeypatch):
    from red_kernels import REDLossConfig

    model, tok = tiny

    def boom(*a, **k):
        raise AssertionError("lm_head forward called: full-vocabulary logits materialised")

    monkeypatch.setattr(model.lm_head, "forward", boom)
    policy = Policy(model, pad_id=tok.pad_token_id)
    b = old_policy_pass(policy, make_batch(), 64, 1.0)
    rec = _Recorder(model.parameters())
    m = policy_update(policy, b, REDLossConfig(), 64, rec, 1.0, b.B)
    sums = {k: v for k, v in m.items()}
    assert sums["ratio_mean@sum"] / sums["ratio_mean@weight"] == pytest.approx(
        1.0, abs=1e-5
    )  # old == current
    assert any(float(g.abs().sum()) > 0 for g in rec.grads)


@pytest.mark.parametrize("total, warmup, floor", [(60, 0, 0.1), (120, 10, 0.1), (7, 3, 0.0)])
def test_lr_schedule_keeps_the_cosine_with_warmup_values(total, warmup, floor):
    import math

    from red.update import make_optimizer

    def old(step):  # the trainer's schedule before it came from transformers
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    opt, sched = make_optimizer(torch.nn.Linear(2, 2), 2.0, [0.9, 0.95], 0.0, total, warmup, floor)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([2.0 * old(s) for s in range(total)], rel=1e-12, abs=1e-15)
