"""red_loss on packed rows (`sequence_ids`) equals red_loss on the same sequences padded one per row."""

import pytest
import torch

from red_kernels import red_loss

BACKENDS = ["torch", "triton"]
H, V = 16, 50
# (prompt length, response length) of each sequence; sequence k is row k of the per-sequence inputs
SEQS = [(2, 3), (1, 5), (3, 2), (2, 4), (1, 1)]
PACKED_ROWS = [[3, 0], [1, 4, 2]]  # packing order inside rows: ids need not follow position order
SETTINGS = {
    "red": dict(offline_shaping="accuracy_shift", sft_coef=0.1, entropy_coef=0.01),
    "luffy": dict(offline_shaping="luffy", entropy_coef=0.01),
    "grpo": dict(offline_shaping="none", kl_coef=0.05),
}
AGGS = {"seq_sum_const": dict(loss_const=8.0), "token_mean": {}, "seq_mean": {}}


def flat_tokens(seed=0, offline=(2, 4)):
    """Per-token tensors of all sequences concatenated (flat position order), plus per-sequence inputs."""
    g = torch.Generator().manual_seed(seed)
    n = sum(p + r for p, r in SEQS)
    seq_of = torch.cat([torch.full((p + r,), k) for k, (p, r) in enumerate(SEQS)])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in SEQS]).bool()
    tokens = dict(
        hidden=torch.randn(n, H, generator=g),
        targets=torch.randint(0, V, (n,), generator=g),
        mask=mask,
        offline=mask & torch.isin(seq_of, torch.tensor(offline, dtype=torch.long)),
        old=torch.randn(n, generator=g) * 0.3 - 3.5,
        ref=torch.randn(n, generator=g) * 0.3 - 3.5,
        seq=seq_of,
    )
    tokens["targets"][~mask] = -100
    per_seq = dict(
        adv=torch.randn(len(SEQS), generator=g),
        r_bar=torch.rand(len(SEQS), generator=g),
        w=1 + torch.rand(len(SEQS), generator=g),
    )
    weight = torch.randn(V, H, generator=g) * 0.3
    return tokens, per_seq, weight


def layout(rows, width, prompt_id=lambda k: k):
    """(index [R, width] into the flat positions, −1 for padding; sequence_ids [R, width])."""
    starts = torch.tensor([0] + [p + r for p, r in SEQS]).cumsum(0)
    index = torch.full((len(rows), width), -1)
    ids = torch.full((len(rows), width), -1)
    for i, row in enumerate(rows):
        col = 0
        for k in row:
            p, r = SEQS[k]
            index[i, col : col + p + r] = torch.arange(starts[k], starts[k] + p + r)
            ids[i, col : col + p] = prompt_id(k)
            ids[i, col + p : col + p + r] = k
            col += p + r
    return index, ids


def run(tokens, per_seq, weight, index, backend, sequence_ids=None, **cfg):
    """loss, logprobs at the flat positions, and grads w.r.t. the flat hidden states and the weight."""
    h = tokens["hidden"].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    valid = index >= 0
    at = lambda t, fill: torch.where(valid, t[index.clamp(min=0)], torch.full_like(t[:1], fill)[0])  # noqa: E731
    hidden = torch.where(valid[..., None], h[index.clamp(min=0)], 0.0)
    out = red_loss(
        hidden,
        w,
        at(tokens["targets"], -100),
        per_seq["adv"],
        loss_mask=at(tokens["mask"], False),
        old_logprobs=at(tokens["old"], 0.0),
        offline_mask=at(tokens["offline"], False),
        group_accuracy=per_seq["r_bar"],
        offline_weight=per_seq["w"],
        ref_logprobs=at(tokens["ref"], 0.0),
        sequence_ids=sequence_ids,
        backend=backend,
        **cfg,
    )
    out.loss.backward()
    logp = torch.zeros(tokens["hidden"].shape[0]).index_put_((index[valid],), out.logprobs[valid])
    return out.loss, logp, h.grad, w.grad


@pytest.mark.parametrize("agg", list(AGGS))
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend, setting, agg):
    tokens, per_seq, weight = flat_tokens(offline=() if setting == "grpo" else (2, 4))
    cfg = dict(SETTINGS[setting], loss_agg=agg, **AGGS[agg])
    width = max(p + r for p, r in SEQS) + 1
    padded = run(tokens, per_seq, weight, layout([[k] for k in range(len(SEQS))], width)[0], backend, **cfg)
    # sequence 1's prompt takes −1 (allowed: prompts are outside loss_mask), the rest their own id
    index, ids = layout(PACKED_ROWS, 14, prompt_id=lambda k: -1 if k == 1 else k)
    packed = run(tokens, per_seq, weight, index, backend, sequence_ids=ids, **cfg)
    assert abs(packed[0].item() - padded[0].item()) <= 1e-5 * abs(padded[0].item())
    assert torch.equal(packed[1] == 0, padded[1] == 0)
    torch.testing.assert_close(packed[1], padded[1], rtol=0, atol=1e-5)
    for g_p, g_d in zip(packed[2:], padded[2:]):
        assert (g_p - g_d).abs().max() <= 1e-5 * g_d.abs().max()


def test_single_packed_row_accepts_1d_ids():
    tokens, per_seq, weight = flat_tokens()
    index, ids = layout([[0, 1, 2, 3, 4]], 24)
    two_d = run(tokens, per_seq, weight, index, "torch", sequence_ids=ids, loss_agg="seq_mean")
    one_d = run(tokens, per_seq, weight, index, "torch", sequence_ids=ids[0], loss_agg="seq_mean")
    assert two_d[0].item() == one_d[0].item()


def _bad(ids_fn=None, per_seq_fn=None, **cfg):
    tokens, per_seq, weight = flat_tokens()
    index, ids = layout(PACKED_ROWS, 14)
    ids = ids if ids_fn is None else ids_fn(ids.clone())
    per_seq = per_seq if per_seq_fn is None else per_seq_fn(dict(per_seq))
    cfg.setdefault("loss_agg", "seq_mean")
    return run(tokens, per_seq, weight, index, "torch", sequence_ids=ids, **cfg)


def _split_run(ids):  # sequence 3 (row 0, columns 0–5) interrupted by sequence 0's id
    ids[0, 2] = 0
    return ids


def _across_rows(ids):  # sequence 2's id also at the start of row 0
    ids[0, 0] = 2
    return ids


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(ids_fn=_split_run), ValueError, "not contiguous"),
        (dict(ids_fn=_across_rows), ValueError, "not contiguous"),
        (dict(ids_fn=lambda ids: ids.float()), TypeError, "sequence_ids"),
        (dict(ids_fn=lambda ids: ids[:, :-1]), ValueError, r"sequence_ids must be \[B, T\]"),
        (dict(ids_fn=lambda ids: torch.where(ids == 4, 7, ids)), ValueError, "sequence_ids go up to 7"),
        (dict(ids_fn=lambda ids: torch.where(ids == 4, -3, ids)), ValueError, "sequence_ids must be ≥ 0"),
        (
            dict(ids_fn=lambda ids: torch.where(ids == 4, -1, ids)),
            ValueError,
            "loss_mask is on where sequence_ids",
        ),
        (dict(per_seq_fn=lambda p: {**p, "r_bar": p["r_bar"][:4]}), ValueError, "one length S"),
        (
            dict(per_seq_fn=lambda p: {**p, "adv": p["adv"][:4], "r_bar": p["r_bar"][:4], "w": p["w"][:4]}),
            ValueError,
            "S = 4",
        ),
        (dict(loss_agg="seq_sum_const"), ValueError, "loss_const"),
    ],
)
def test_bad_sequence_ids_raise_clear_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kw)
