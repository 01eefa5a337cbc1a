"""The RL step's skipped old-policy pass (red/step.py): on-policy (one optimizer step per rollout batch, one epoch,
no TIS) the update's own detached log-probs are the old log-probs, and RED's pre-step entropies come from the
update's forward of the online part plus a no-grad pass over the offline rows only. Checked against the same step
with the full old-policy pass forced: same rollouts, same losses, metrics, offline weight w and gradients."""

import json

import pytest
import torch
from test_loop import TINY

import red.step as step
import red.update
from red.train import main


class _Recording:
    """Optimizer stand-in: records the clipped gradients step() would apply and leaves the parameters as they are
    (so both runs see the same policy at every step)."""

    def __init__(self, opt, grads):
        self.opt, self.grads = opt, grads

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.grads.append([p.grad.detach().clone() for p in params])


def _run(tmp_path, monkeypatch, mode, skip, name, freeze=True, frozen=None):
    grads, passes = [], []

    def update(policy, plan, loss_cfg, opt, *a, **k):
        if frozen is not None:
            frozen.append(sum(len(mb.rows) for mb in plan.frozen if mb.loss_mask.any()))
        return red.update.update(policy, plan, loss_cfg, _Recording(opt, grads), *a, **k)

    def forward_pass(policy, mbs, temperature):
        passes.append([bool(mb.offline_mask.any()) for mb in mbs if len(mb.rows)])
        return red.update.forward_pass(policy, mbs, temperature)

    monkeypatch.setattr(step, "update", update)
    monkeypatch.setattr(step, "forward_pass", forward_pass)
    monkeypatch.setattr(step, "on_policy", lambda cfg: skip)
    if not freeze:  # every sequence backpropagated, the gradient-free ones too
        monkeypatch.setattr(
            step, "gradient_free", lambda adv, off, cfg: torch.zeros(adv.shape, dtype=torch.bool)
        )
    out = tmp_path / name
    args = [f"output_dir={out}", f"algorithm.mode={mode}", "train.steps=3", "eval.before=false", *TINY]
    assert main([*args, "algorithm.dynamic_sampling=false", "train.micro_batch_tokens=96"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]
    return rows, grads, passes


@pytest.mark.parametrize("mode", ["grpo", "luffy", "red"])
def test_skipping_the_old_pass_keeps_losses_weights_and_gradients(tmp_path, monkeypatch, mode):
    ref, g_ref, p_ref = _run(tmp_path, monkeypatch, mode, False, "with-pass")
    got, g_got, p_got = _run(tmp_path, monkeypatch, mode, True, "skipped")
    assert len(ref) == len(got) == 3 and len(g_ref) == len(g_got) == 3
    assert all(len(p) > 1 and any(not o for o in p) for p in p_ref)  # the forced pass covers every row
    if mode == "red":  # the no-grad pass covers the offline rows only, every step
        assert len(p_got) == 3 and all(p and all(p) for p in p_got)
    else:
        assert p_got == []
    for a, b in zip(ref, got):
        assert a["reward_mean"] == b["reward_mean"]  # the same rollouts
        for key in ("loss", "pg_online", "pg_offline", "H_on", "H_off", "w", "w_raw", "grad_norm"):
            if a.get(key) is None:
                assert b.get(key) is None, key
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert a["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and b["ratio_mean"] == 1.0
    if mode == "red":
        assert ref[-1]["w"] != 1.0  # the entropy-change weight was exercised
    for s_ref, s_got in zip(g_ref, g_got):
        for x, y in zip(s_ref, s_got):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("skip", [True, False])
def test_gradient_free_sequences_run_without_backward_and_change_nothing(tmp_path, monkeypatch, skip):
    """RED zeroes the online advantages of teacher-only groups (teacher_only_groups=zero_online): those sequences
    send no gradient, so the step runs them in the plan's frozen part, without a backward. Same metrics (the frozen
    sequences' log-probs, entropies and loss terms still count) and gradients as backpropagating through them."""
    frozen = []
    got, g_got, _ = _run(tmp_path, monkeypatch, "red", skip, "frozen", frozen=frozen)
    ref, g_ref, _ = _run(tmp_path, monkeypatch, "red", skip, "all-backward", freeze=False)
    assert len(frozen) == 3 and any(frozen)  # the frozen part was exercised
    assert all(r["gradient_free_frac"] > 0 for r in got) and all(r["gradient_free_frac"] == 0 for r in ref)
    for a, b in zip(ref, got):
        assert a["reward_mean"] == b["reward_mean"]  # the same rollouts
        for key in [k for k in a if not k.startswith(("time_", "mem_", "tokens_per_s", "gradient_free"))]:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
            else:
                assert b[key] == a[key], key
    for s_ref, s_got in zip(g_ref, g_got):
        for x, y in zip(s_ref, s_got):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)
