"""Mixed precision through the trainer's update (red/update.py): float32 master weights and AdamW state, forward
and backward under autocast. At lr 2e-6 a bf16 run moves the fp32 weights as the fp32 run does, while AdamW on
bf16 parameters (what the trainer did before) loses most of each update to rounding; fp16 uses a GradScaler."""

import copy

import pytest
import torch
from conftest import tiny_model
from test_batching import make_batch

from red.update import Policy, make_optimizer, old_policy_pass, policy_update

STEPS, LR = 4, 2e-6


def _train(model, dtype, batch):
    """STEPS updates on the same batch; returns the parameter change (float32) and the policy."""
    from red_kernels import REDLossConfig

    before = [p.detach().float().clone() for p in model.parameters()]
    policy = Policy(model, dtype, pad_id=0)
    opt, _ = make_optimizer(model, LR, [0.9, 0.95], 0.0, 100, 0, 0.1)
    b = old_policy_pass(policy, batch, 64, 1.0)
    for _ in range(STEPS):
        policy_update(policy, b, REDLossConfig(loss_const=8.0), 64, opt, 1e9, b.B)
    delta = torch.cat([(p.detach().float() - w).reshape(-1) for p, w in zip(model.parameters(), before)])
    return delta, policy, opt


@pytest.fixture(scope="module")
def setup():
    model, _ = tiny_model(seed=3)
    return model, make_batch(8, seed=2)


def _close(a, b):
    rel = float((a.norm() - b.norm()).abs() / b.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return rel, cos


def test_bf16_autocast_moves_fp32_master_weights_like_fp32(setup):
    model, batch = setup
    ref, _, _ = _train(copy.deepcopy(model), "float32", batch)
    bf, policy, opt = _train(copy.deepcopy(model), "bfloat16", batch)
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.dim())
    rel, cos = _close(bf, ref)
    assert rel < 0.05 and cos > 0.99, (rel, cos)
    assert policy.precision() == {
        "params": "float32",
        "compute": "bfloat16",
        "optimizer_state": "float32",
        "grad_reduce": "float32",
        "loss_scaling": False,
    }
    # the previous design: AdamW directly on bf16 parameters; most of each lr-sized step rounds away
    old = copy.deepcopy(model).to(torch.bfloat16)
    ref_bf = torch.cat([p.detach().float().reshape(-1) for p in old.parameters()])
    opt_old = torch.optim.AdamW(old.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    for p, d in zip(old.parameters(), torch.split(ref, [p.numel() for p in old.parameters()])):
        p.grad = (d / LR).reshape(p.shape).to(torch.bfloat16)  # gradients pointing along the fp32 update
    for _ in range(STEPS):
        opt_old.step()
    lost = torch.cat([p.detach().float().reshape(-1) for p in old.parameters()]) - ref_bf
    assert float(lost.norm()) < 0.5 * float(ref.norm())


def test_fp16_uses_a_grad_scaler_and_keeps_weights_finite(setup):
    model, batch = setup
    ref, _, _ = _train(copy.deepcopy(model), "float32", batch)
    fp16, policy, _ = _train(copy.deepcopy(model), "float16", batch)
    assert policy.scaler is not None and torch.isfinite(torch.tensor(policy.scaler.get_scale()))
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())
    rel, cos = _close(fp16, ref)
    assert rel < 0.05 and cos > 0.99, (rel, cos)
