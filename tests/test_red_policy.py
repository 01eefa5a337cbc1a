"""Batching, the old-policy pass and the update: alignment against full logits in float64, micro-batch gradient
accumulation equal to the full batch, and no full-vocabulary logits anywhere in the trainer's passes."""
import pytest
import torch
from conftest import tiny_model

from red.policy import IGNORE, Sequence, collate, micro_batches, old_policy_pass
from red.trainer import policy_update


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def _seqs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 200, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(Sequence(p, r, is_offline=(i % 3 == 2), advantage=float(i - 2.5), group_accuracy=0.25 + 0.1 * i,
                            offline_weight=1.5, engine_logprobs=None if i % 3 == 2 else [-1.0] * len(r)))
    return out


def test_micro_batches_respect_the_token_budget():
    assert micro_batches([5, 3, 8, 2], 10) == [[2], [0, 1], [3]]
    assert micro_batches([4, 4, 4], 100) == [[0, 1, 2]]
    assert micro_batches([50, 1], 10) == [[0], [1]]          # a sequence over budget goes alone


def test_collate_aligns_targets_with_responses():
    b = collate([Sequence([5, 6, 7], [8, 9], is_offline=True), Sequence([5], [4], engine_logprobs=[-0.5])], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert b.targets.tolist() == [[IGNORE, IGNORE, 8, 9], [4, IGNORE, IGNORE, IGNORE]]
    assert b.offline_mask.tolist() == [[False, False, True, True], [False] * 4]
    assert b.engine_logprobs[1, 0] == -0.5 and b.engine_mask.tolist()[1] == [True, False, False, False]


def test_old_policy_pass_matches_full_logits_in_float64(tiny):
    model, tok = tiny
    seqs = _seqs()
    lp, ent = old_policy_pass(model, seqs, tok.pad_token_id, token_budget=16, temperature=0.7, device="cpu")
    model64 = model.double()
    try:
        for s, l, e in zip(seqs, lp, ent):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model64(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1] / 0.7
            ref = torch.log_softmax(logits, -1)
            ref_lp = ref.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
            ref_ent = -(ref.exp() * ref).sum(-1)
            assert torch.allclose(l.double(), ref_lp, atol=1e-4) and torch.allclose(e.double(), ref_ent, atol=1e-4)
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


@pytest.mark.parametrize("agg", ["seq_sum_const", "token_mean", "seq_mean"])
def test_micro_batch_accumulation_equals_full_batch(tiny, agg):
    from red_kernels import REDLossConfig
    model, tok = tiny
    seqs = _seqs(7, seed=1)
    cfg = REDLossConfig(loss_agg=agg, loss_const=8.0, r_min=1 / 16)
    runs = []
    for budget in (10_000, 12):          # one micro-batch vs many
        rec = _Recorder(model.parameters())
        m = policy_update(model, seqs, cfg, tok.pad_token_id, budget, "cpu", rec, grad_clip=1e9)
        runs.append((m, rec.grads))
    (m1, g1), (m2, g2) = runs
    assert len(micro_batches([s.length for s in seqs], 12)) > 2
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_trainer_passes_never_materialise_full_logits(tiny, monkeypatch):
    from red_kernels import REDLossConfig
    model, tok = tiny

    def boom(*a, **k):
        raise AssertionError("lm_head forward called: full-vocabulary logits materialised")
    monkeypatch.setattr(model.lm_head, "forward", boom)
    seqs = _seqs()
    old, _ = old_policy_pass(model, seqs, tok.pad_token_id, 64, 1.0, "cpu")
    rec = _Recorder(model.parameters())
    m = policy_update(model, seqs, REDLossConfig(), tok.pad_token_id, 64, "cpu", rec, 1.0, old=old)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)     # old == current: rho = 1
    assert any(float(g.abs().sum()) > 0 for g in rec.grads)
