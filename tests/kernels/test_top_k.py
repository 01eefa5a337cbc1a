"""linear_logprobs(top_k=k): log-probs and entropies of the top-k truncated, renormalised distribution, exact on the
chunked backend against a float64 reference, and the importance-ratio bias it removes when rollouts are sampled
with top-k (measured on a small vocabulary against float64 sampler log-probs)."""

import pytest
import torch

from red_kernels import backends, linear_logprobs
from red_kernels.logprobs import _top_k_backend
from red_kernels.reference import reference_logprobs


def _data(n=9, h=6, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype) * 2
    w = torch.randn(v, h, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -100
    return x, w, b, y


@pytest.mark.parametrize("k", [1, 3, 10, 11, 40])
@pytest.mark.parametrize("transform", [{}, {"softcap": 2.0, "logit_scale": 0.7}])
def test_values_and_gradients_match_the_float64_reference(k, transform):
    """Several row chunks (chunk_size=2), targets inside and outside the kept set, temperature 0.8; the gradient
    through both outputs w.r.t. hidden, weight and bias."""
    x, w, b, y = _data()
    kw = dict(bias=None, temperature=0.8, top_k=k, **transform)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    outs = []
    for fn in ("torch", "reference"):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        if fn == "torch":
            lp, ent = linear_logprobs(xs, ws, y, **{**kw, "bias": bs}, backend="torch", chunk_size=2)
        else:
            lp, ent = reference_logprobs(xs, ws, y, bs, 0.8, top_k=k, **transform)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        outs.append((lp.detach().double(), ent.detach().double(), xs.grad, ws.grad, bs.grad))
    for a, r in zip(*outs):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)
    lp = outs[1][0]
    if k < w.shape[0]:  # truncation changed the numbers: not the full softmax
        full, _ = reference_logprobs(x, w, y, b, 0.8, **transform)
        assert (lp - full).abs().max() > 1e-3
        assert (
            lp[y != -100] > full[y != -100] - 1e-12
        ).all()  # renormalising over fewer tokens only raises p


def test_a_target_outside_the_top_k_is_scored_within_the_set_plus_itself():
    w = torch.eye(4) * torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    x = torch.ones(1, 4)
    lp, ent = linear_logprobs(x, w, torch.tensor([3]), top_k=2, backend="torch")
    z = torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64)  # tokens 0, 1 (the top 2) and the target 3
    assert float(lp) == pytest.approx(float(z.log_softmax(0)[2]), rel=1e-6)
    p = z.softmax(0)
    assert float(ent) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


def test_ties_at_the_k_th_value_are_kept():
    w = torch.eye(4) * torch.tensor([2.0, 1.0, 1.0, 0.0])[:, None]  # logits 2, 1, 1, 0: top-2 keeps 3 tokens
    lp, _ = linear_logprobs(torch.ones(1, 4), w, torch.tensor([0]), top_k=2, backend="torch")
    z = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    assert float(lp) == pytest.approx(float(z.log_softmax(0)[0]), rel=1e-6)


def test_one_sweep_path_matches_the_two_pass_path():
    """forward_with_grad (stats kept for dz, as the fused losses run it) against forward_stats + backward."""
    x, w, b, y = _data(seed=3)
    y = y.clamp(min=0)
    zm = backends.LogitMap(0.9, 1.0, None, 4)
    be = backends.ops("torch")
    g_lp, g_h = torch.linspace(-1, 1, len(y)), torch.linspace(0.5, -0.5, len(y))
    logp, ent, *grads = backends.forward_with_grad(
        be, x, w, b, y, zm, lambda rows, lp, h: (g_lp[rows], g_h[rows]), 4
    )
    stats = backends.forward_stats(be, x, w, b, y, zm, 4)
    torch.testing.assert_close(logp, stats[3] - stats[1])
    torch.testing.assert_close(ent, stats[1] - stats[2])
    for a, r in zip(grads, backends.backward(be, x, w, b, y, zm, stats, g_lp, g_h, 4)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_top_k_backend_choice_and_refusals():
    assert _top_k_backend("triton", None, None) == "torch"  # auto on CUDA: the exact chunked path
    assert _top_k_backend("torch", "torch", None) == "torch"
    with pytest.raises(NotImplementedError, match="chunked backend only"):
        _top_k_backend("triton", "triton", None)
    with pytest.raises(NotImplementedError, match="process_group"):
        _top_k_backend("torch", None, object())
    x, w, b, y = _data()
    with pytest.raises(NotImplementedError, match="chunked backend only"):
        linear_logprobs(x, w, y, top_k=3, backend="triton")  # TRITON_INTERPRET=1 (conftest): Triton resolves
    with pytest.raises(NotImplementedError, match="top_k truncation"):
        backends.ops("triton")._zmap_args(backends.LogitMap(1.0, 1.0, None, 3), False)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="top_k must be None"):
            linear_logprobs(x, w, y, top_k=bad, backend="torch")


def _sample_top_k(z, k, n, generator):
    """n tokens per row from the top-k truncated softmax of float64 logits z [R, V], and their float64
    log-probs (what a sampler records)."""
    kth = z.sort(-1, descending=True).values[:, k - 1 : k]
    logq = z.masked_fill(z < kth, float("-inf")).log_softmax(-1)
    tokens = torch.multinomial(logq.exp(), n, replacement=True, generator=generator)
    return tokens, logq.gather(1, tokens)


def test_ratio_bias_with_and_without_top_k_against_float64_sampler_logprobs():
    """On-policy rollouts sampled with top-k (V = 16, k = 4, temperature 1): the true ratio π/π_sampler is 1.
    Scoring the full softmax gives log-ratios of log(top-k mass) < 0 — a bias equal, token by token, to the
    float64 log-mass the truncation removed; scoring with top_k=k leaves only fp32 rounding."""
    v, h, rows, k, n = 16, 8, 12, 4, 64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.6
    z = x.double() @ w.double().t()
    tokens, sampler_lp = _sample_top_k(z, k, n, g)
    xs = x[:, None].expand(rows, n, h)
    full, _ = linear_logprobs(xs, w, tokens, backend="torch")
    trunc, _ = linear_logprobs(xs, w, tokens, top_k=k, backend="torch")
    bias_full = (full.double() - sampler_lp).mean()
    bias_trunc = (trunc.double() - sampler_lp).abs().max()
    kth = z.sort(-1, descending=True).values[:, k - 1 : k]
    log_mass = torch.logsumexp(z.masked_fill(z < kth, float("-inf")), -1) - torch.logsumexp(
        z, -1
    )  # [rows] < 0
    expected = log_mass[:, None].expand(rows, n).mean()
    assert float(bias_full) == pytest.approx(float(expected), rel=1e-5)
    assert float(bias_full) < -0.1  # the full-softmax ratio is biased low by the truncated mass
    assert float(bias_trunc) < 1e-5  # with top_k the ratio is 1 up to fp32 rounding
