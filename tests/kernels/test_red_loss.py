"""red_loss against an independent float64 implementation, Liger's GRPO loss, and micro-batch accumulation."""

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from red_kernels import REDLossConfig, red_loss
from red_kernels.reference import naive_red_loss

DEVICE = os.environ.get("RED_KERNELS_TEST_DEVICE", "cpu")
BACKENDS = ["torch", "triton"]


def make_batch(B=3, T=7, H=24, V=67, seed=0, dtype=torch.float32, bias=False, offline_rows=(2,)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (1.5 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :2] = False  # prompt positions
    mask[0, T - 2 :] = False  # padding after a short response
    targets[0, T - 2 :] = -100
    offline = torch.zeros(B, T, dtype=torch.bool)
    for r in offline_rows:
        offline[r] = mask[r]
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 + (-4.0)  # ratios far from 1: both clip sides active
    ref = torch.randn(B, T, generator=g) * 0.3 - 4.0
    r_bar = torch.rand(B, generator=g)
    w = 1 + torch.rand(B, generator=g) * 3
    t = dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        targets=targets,
        adv=adv,
        mask=mask,
        offline=offline,
        old=old,
        ref=ref,
        r_bar=r_bar,
        w=w,
        bias=None if b is None else b.to(dtype),
    )
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def ours(batch, backend, **cfg):
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    b = None if batch["bias"] is None else batch["bias"].clone().requires_grad_()
    out = red_loss(
        h,
        w,
        batch["targets"],
        batch["adv"],
        loss_mask=batch["mask"],
        old_logprobs=batch["old"],
        offline_mask=batch["offline"],
        group_accuracy=batch["r_bar"],
        offline_weight=batch["w"],
        ref_logprobs=batch["ref"],
        bias=b,
        backend=backend,
        **cfg,
    )
    out.loss.backward()
    return out, [t.grad for t in (h, w, b) if t is not None]


def reference(batch, **cfg):
    h = batch["hidden"].double().requires_grad_()
    w = batch["weight"].double().requires_grad_()
    b = None if batch["bias"] is None else batch["bias"].double().requires_grad_()
    loss = naive_red_loss(
        h,
        w,
        batch["targets"],
        batch["adv"],
        batch["mask"],
        old=batch["old"],
        offline=batch["offline"],
        r_bar=batch["r_bar"],
        w=batch["w"],
        ref=batch["ref"],
        bias=b,
        **cfg,
    )
    loss.backward()
    return loss, [t.grad for t in (h, w, b) if t is not None]


def assert_close(out, grads, ref_loss, ref_grads, loss_tol=1e-5, grad_tol=1e-4):
    assert torch.isfinite(out.loss).all()
    assert abs(out.loss.item() - ref_loss.item()) <= loss_tol * max(1.0, abs(ref_loss.item()))
    for g, rg in zip(grads, ref_grads):
        scale = rg.abs().max().item()
        assert scale > 0
        err = (g.double() - rg).abs().max().item()
        assert err <= grad_tol * scale, f"grad err {err:.3g} vs scale {scale:.3g}"


COMBOS = list(
    itertools.product(
        ["none", "luffy", "accuracy_shift"],
        ["seq_sum_const", "token_mean", "seq_mean"],
        [0.0, 0.3],
        [0.0, 0.05],
        [0.0, 0.1],
    )
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shaping,agg,sft,ent,kl", COMBOS)
def test_every_configuration_matches_float64(backend, shaping, agg, sft, ent, kl):
    batch = make_batch(seed=len(shaping) + len(agg))
    cfg = dict(
        offline_shaping=shaping, loss_agg=agg, sft_coef=sft, entropy_coef=ent, kl_coef=kl, temperature=0.8
    )
    out, grads = ours(batch, backend, **cfg)
    ref_loss, ref_grads = reference(batch, **cfg)
    assert_close(out, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_dual_clip_per_token_advantages_and_is_weights(backend):
    batch = make_batch(bias=True, seed=5)
    g = torch.Generator().manual_seed(1)
    batch["adv"] = torch.randn(batch["targets"].shape, generator=g).to(DEVICE)
    is_w = (torch.rand(batch["targets"].shape, generator=g) * 2).to(DEVICE)
    cfg = dict(dual_clip=3.0, loss_agg="token_mean", loss_const=None, clip_eps_high=0.1)
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    b = batch["bias"].clone().requires_grad_()
    out = red_loss(
        h,
        w,
        batch["targets"],
        batch["adv"],
        loss_mask=batch["mask"],
        old_logprobs=batch["old"],
        offline_mask=batch["offline"],
        group_accuracy=batch["r_bar"],
        offline_weight=batch["w"],
        is_weights=is_w,
        bias=b,
        backend=backend,
        **cfg,
    )
    out.loss.backward()
    hr, wr, br = (t.double().requires_grad_() for t in (batch["hidden"], batch["weight"], batch["bias"]))
    ref = naive_red_loss(
        hr,
        wr,
        batch["targets"],
        batch["adv"],
        batch["mask"],
        old=batch["old"],
        offline=batch["offline"],
        r_bar=batch["r_bar"],
        w=batch["w"],
        is_w=is_w,
        bias=br,
        **cfg,
    )
    ref.backward()
    assert_close(out, [h.grad, w.grad, b.grad], ref, [hr.grad, wr.grad, br.grad])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,scale", [(2.0, 1.0), (None, 0.6), (4.0, 1.8)])
def test_softcap_and_logit_scale_match_float64(backend, softcap, scale):
    batch = make_batch(bias=True, seed=17)
    batch["hidden"] = batch["hidden"] * 3  # some logits reach the saturating part of the tanh
    cfg = dict(softcap=softcap, logit_scale=scale, temperature=0.9, entropy_coef=0.01, kl_coef=0.05)
    out, grads = ours(batch, backend, **cfg)
    ref_loss, ref_grads = reference(batch, **cfg)
    assert_close(out, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    batch = make_batch(dtype=torch.bfloat16, seed=3)
    out, grads = ours(batch, backend, sft_coef=0.1, entropy_coef=0.01)
    ref_loss, ref_grads = reference(batch, sft_coef=0.1, entropy_coef=0.01)
    assert_close(out, grads, ref_loss, ref_grads, loss_tol=2e-3, grad_tol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["seq_sum_const", "token_mean", "seq_mean"])
def test_micro_batches_with_global_normaliser_reproduce_full_batch(backend, agg):
    batch = make_batch(B=4, seed=11, offline_rows=(1, 3))
    full, full_grads = ours(batch, backend, loss_agg=agg)
    g_norm = batch["mask"].sum().item() if agg == "token_mean" else batch["mask"].shape[0]
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        out = red_loss(
            h[rows],
            w,
            batch["targets"][rows],
            batch["adv"][rows],
            loss_mask=batch["mask"][rows],
            old_logprobs=batch["old"][rows],
            offline_mask=batch["offline"][rows],
            group_accuracy=batch["r_bar"][rows],
            offline_weight=batch["w"][rows],
            backend=backend,
            loss_agg=agg,
            global_normalizer=g_norm,
        )
        out.loss.backward()
        total += out.loss.item()
    assert abs(total - full.loss.item()) < 1e-6
    for g, fg in zip((h.grad, w.grad), full_grads):
        assert (g - fg).abs().max().item() <= 1e-5 * fg.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["no_offline", "only_offline", "empty_mask"])
def test_degenerate_micro_batches_are_finite(backend, case):
    batch = make_batch(seed=2, offline_rows=() if case == "no_offline" else (0, 1, 2))
    if case == "empty_mask":
        batch["mask"] = torch.zeros_like(batch["mask"])
        batch["offline"] = torch.zeros_like(batch["offline"])
    for agg in ("seq_sum_const", "token_mean", "seq_mean"):
        out, grads = ours(batch, backend, loss_agg=agg, entropy_coef=0.01)
        ref_loss, ref_grads = reference(batch, loss_agg=agg, entropy_coef=0.01)
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(v).all() for v in out.metrics.values())
        if case == "empty_mask":
            assert out.loss.item() == 0.0 and all((g == 0).all() for g in grads)
        else:
            assert_close(out, grads, ref_loss, ref_grads)


def test_metrics_hand_checked():
    batch = make_batch(seed=4)
    out, _ = ours(batch, "torch")
    on = batch["mask"] & ~batch["offline"]
    ratio = (out.logprobs - batch["old"]).exp()[on]
    adv = batch["adv"][:, None].expand_as(batch["mask"])[on]
    assert out.metrics["clip_frac_high"].item() == pytest.approx(
        ((ratio > 1.28) & (adv > 0)).float().mean().item()
    )
    assert out.metrics["clip_frac_low"].item() == pytest.approx(
        ((ratio < 0.8) & (adv < 0)).float().mean().item()
    )
    p_off = out.logprobs[batch["offline"]].exp()
    assert out.metrics["teacher_prob"].item() == pytest.approx(p_off.mean().item(), rel=1e-5)
    assert out.metrics["entropy_offline"].item() == pytest.approx(
        out.entropy[batch["offline"]].mean().item(), rel=1e-5
    )
    assert (out.logprobs[~batch["mask"]] == 0).all()
    parts = sum(out.metrics[k] for k in ("pg_online", "pg_offline", "sft", "entropy_bonus", "kl"))
    assert parts.item() == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "agg,liger_type", [("seq_mean", "grpo"), ("token_mean", "bnpo"), ("seq_sum_const", "dr_grpo")]
)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_pure_grpo_matches_liger(agg, liger_type, beta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    batch = make_batch(seed=7, offline_rows=())
    batch["old"] = batch["old"] * 0 + (-4.2)
    T = batch["targets"].shape[1]
    liger = LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=liger_type,
        max_completion_length=T,
        temperature=0.9,
    )
    h1 = batch["hidden"].clone().requires_grad_()
    w1 = batch["weight"].clone().requires_grad_()
    tgt = batch["targets"].clamp(min=0)
    res = liger(
        h1,
        w1,
        tgt,
        batch["mask"].long(),
        batch["adv"],
        old_per_token_logps=batch["old"],
        ref_per_token_logps=batch["ref"] if beta else None,
    )
    liger_loss = res[0] if isinstance(res, tuple) else res
    liger_loss.backward()
    out, (gh, gw) = ours(batch, "torch", loss_agg=agg, kl_coef=beta, temperature=0.9, clip_eps_high=0.28)
    assert out.loss.item() == pytest.approx(liger_loss.item(), rel=1e-5, abs=1e-7)
    assert (gh - h1.grad).abs().max() <= 1e-4 * h1.grad.abs().max()
    assert (gw - w1.grad).abs().max() <= 1e-4 * w1.grad.abs().max()


@given(
    B=st.integers(1, 4),
    T=st.integers(1, 9),
    H=st.integers(1, 40),
    V=st.integers(2, 300),
    seed=st.integers(0, 10_000),
    shaping=st.sampled_from(["none", "luffy", "accuracy_shift"]),
    agg=st.sampled_from(["seq_sum_const", "token_mean", "seq_mean"]),
)
@settings(max_examples=25, deadline=None)
def test_random_shapes_match_float64(B, T, H, V, seed, shaping, agg):
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(B=B, T=max(T, 3), H=H, V=V, seed=seed, offline_rows=(B - 1,))
    batch["mask"] = (torch.rand(batch["mask"].shape, generator=g) < 0.7).to(DEVICE) | batch["offline"]
    batch["targets"] = torch.where(batch["mask"], batch["targets"].clamp(min=0), -100)
    cfg = dict(offline_shaping=shaping, loss_agg=agg, entropy_coef=0.02, sft_coef=0.1)
    out, grads = ours(batch, "torch", **cfg)
    ref_loss, ref_grads = reference(batch, **cfg)
    if batch["mask"].any() and all(rg.abs().max() > 0 for rg in ref_grads):
        assert_close(out, grads, ref_loss, ref_grads)
    else:
        assert out.loss.item() == pytest.approx(ref_loss.item(), abs=1e-7)


def _bad(**kw):
    batch = make_batch()
    args = dict(
        loss_mask=batch["mask"],
        old_logprobs=batch["old"],
        offline_mask=batch["offline"],
        group_accuracy=batch["r_bar"],
        offline_weight=batch["w"],
    )
    args.update(kw)
    adv = args.pop("advantages", batch["adv"])
    return red_loss(batch["hidden"], batch["weight"], batch["targets"], adv, **args)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_mask=torch.ones(3, 6, dtype=torch.bool)), "loss_mask"),
        (dict(offline_mask=torch.ones(3, 7, dtype=torch.bool)), "offline_mask"),
        (dict(advantages=torch.tensor([0.0, float("nan"), 1.0])), "advantages"),
        (dict(advantages=torch.ones(2)), "advantages"),
        (dict(group_accuracy=torch.tensor([0.5, 1.5, 0.0])), "group_accuracy"),
        (dict(group_accuracy=None), "group_accuracy"),
        (dict(offline_weight=torch.tensor([1.0, float("inf"), 1.0])), "offline_weight"),
        (dict(old_logprobs=torch.full((3, 7), float("nan"))), "old_logprobs"),
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(loss_agg="mean"), "loss_agg"),
        (dict(offline_shaping="sft"), "offline_shaping"),
        (dict(clip_eps_low=1.5), "clip_eps_low"),
        (dict(softcap=0.0), "softcap"),
        (dict(logit_scale=-1.0), "logit_scale"),
        (dict(not_a_key=1), "not_a_key"),
        (dict(global_normalizer=0), "global_normalizer"),
        (dict(global_normalizer=-2.0), "global_normalizer"),
        (dict(global_normalizer=float("nan")), "global_normalizer"),
    ],
)
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _bad(**kw)


def test_config_object_and_module_agree():
    from red_kernels import FusedLinearREDLoss

    batch = make_batch()
    cfg = REDLossConfig(offline_shaping="luffy", loss_agg="token_mean")
    mod = FusedLinearREDLoss(cfg, backend="torch")
    a = mod(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["adv"],
        loss_mask=batch["mask"],
        offline_mask=batch["offline"],
        offline_weight=batch["w"],
    )
    b = red_loss(
        batch["hidden"],
        batch["weight"],
        batch["targets"],
        batch["adv"],
        loss_mask=batch["mask"],
        offline_mask=batch["offline"],
        offline_weight=batch["w"],
        offline_shaping="luffy",
        loss_agg="token_mean",
        backend="torch",
    )
    assert a.loss.item() == b.loss.item()


def _strided_view(t):
    """t's values as a non-contiguous view (every other element of a twice-as-wide tensor)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_match_float64(backend):
    """Every tensor argument of red_loss as a non-contiguous view (bias included: stride 2 was wrong on Triton);
    the gradients flow through the views into their (contiguous) leaves."""
    batch = make_batch(bias=True, seed=13)
    g = torch.Generator().manual_seed(3)
    batch["adv"] = torch.randn(batch["targets"].shape, generator=g).to(DEVICE)  # per-token: a [B, T] view
    bases = {k: torch.stack([v, torch.zeros_like(v)], dim=-1) for k, v in batch.items()}
    leaves = [bases[k].requires_grad_() for k in ("hidden", "weight", "bias")]
    v = {k: t[..., 0] for k, t in bases.items()}
    assert not any(t.is_contiguous() for t in v.values())
    cfg = dict(kl_coef=0.05, entropy_coef=0.01, sft_coef=0.1, temperature=0.9)
    out = red_loss(
        v["hidden"],
        v["weight"],
        v["targets"],
        v["adv"],
        loss_mask=v["mask"],
        old_logprobs=v["old"],
        offline_mask=v["offline"],
        group_accuracy=v["r_bar"],
        offline_weight=v["w"],
        ref_logprobs=v["ref"],
        bias=v["bias"],
        backend=backend,
        **cfg,
    )
    grads = [g[..., 0] for g in torch.autograd.grad(out.loss, leaves)]
    ref_loss, ref_grads = reference(batch, **cfg)
    assert_close(out, grads, ref_loss, ref_grads)
