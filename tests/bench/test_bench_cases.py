"""bench/: FLOP counts against kernels.md's table, and the benchmark implementations against float64 references
(so that every benchmark compares implementations of the same computation)."""

import pytest
import torch

from bench import cases, impls
from red_kernels.reference import naive_red_loss as reference_loss
from red_kernels.reference import reference_logprobs


def test_flops_match_the_spec_table():
    # kernels.md, "The physical limit": T = 16,384, V = 151,936; one GEMM 7.65 TFLOP (H 1536) and 4.46 (H 896);
    # forward+backward with recompute (4 GEMMs) at 800 TFLOP/s: 38.2 ms and 22.3 ms.
    big = cases.Case("logprobs", "fwd", "qwen2.5-1.5b", 16_384, "triton", "cuda")
    assert big.flop / 1e12 == pytest.approx(7.65, abs=0.005)
    small = cases.Case("logprobs", "fwdbwd", "qwen2.5-0.5b", 16_384, "triton", "cuda")
    assert small.gemms == 4
    assert small.flop / 1e12 / cases.PEAK_TFLOPS * 1e3 == pytest.approx(22.3, abs=0.05)
    # naive keeps the logits: forward + dX + dW; red_loss's torch path forms the gradient in its forward sweep.
    assert (
        cases.Case("logprobs", "fwdbwd", "qwen2.5-0.5b", 4096, "naive").flop == 3 * 2 * 4096 * 896 * 151_936
    )
    assert cases.Case("loss", "red", "qwen2.5-0.5b", 4096, "torch").gemms == 3
    assert cases.Case("loss", "grpo", "qwen2.5-0.5b", 4096, "liger").gemms == 4


def test_case_lists_cover_every_mode_and_baseline():
    cpu = cases.cpu_cases("logprobs") + cases.cpu_cases("loss")
    head = {(c.op, c.mode, c.impl) for c in cpu if (c.model, c.tokens) == ("qwen2.5-0.5b", 4096)}
    for mode in cases.MODES["logprobs"]:
        assert {("logprobs", mode, "naive"), ("logprobs", mode, "torch")} <= head
    assert {("loss", "red", "naive"), ("loss", "red", "torch"), ("loss", "grpo", "liger")} <= head
    gpu = cases.gpu_cases("logprobs") + cases.gpu_cases("loss")
    assert all(c.dtype == torch.bfloat16 for c in gpu) and max(c.tokens for c in gpu) == 16_384
    assert {c.impl for c in gpu} == {"naive", "torch", "triton", "liger", "trl", "liger_flsce"}
    # the side-by-side with the peers: every implementation at both Qwen shapes, one N, with entropy
    peer = {(c.model, c.impl) for c in cpu if (c.mode, c.tokens) == ("fwdbwd", cases.PEER_TOKENS)}
    assert peer == {
        (m, i) for m in ("qwen2.5-0.5b", "qwen2.5-1.5b") for i in ("naive", "torch") + cases.PEERS
    }
    assert not any(c.impl in cases.PEERS for c in gpu if c.op == "loss")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(cases.MODELS, "tiny", (32, 300))
    monkeypatch.setattr(cases, "SEQ_LEN", 48)
    return "tiny"


def _grads64(case, inp):
    """float64 reference of what impls.build(case) returns (outputs, then dX, dW)."""
    x = inp["hidden"].detach().double().requires_grad_()
    w = inp["weight"].detach().double().requires_grad_()
    logp, ent = reference_logprobs(x, w, inp["targets"])
    outs = [logp] + ([ent] if case.mode in ("fwd", "fwdbwd") and case.impl != "liger" else [])
    if case.mode != "fwd":
        obj = (logp * inp["g_lp"].double()).sum()
        if case.mode == "fwdbwd":
            obj = obj + (ent * inp["g_h"].double()).sum()
        obj.backward()
        outs += [x.grad, w.grad]
    return outs


# Liger's CE has no entropy and Liger has no RED loss: those pairs are not benchmarked.
LOGPROB_PAIRS = [
    (m, i)
    for m in cases.MODES["logprobs"]
    for i in ("naive", "torch", "liger") + cases.PEERS
    if (m, i) != ("fwdbwd", "liger")
]
LOSS_PAIRS = [
    (m, i) for m in cases.MODES["loss"] for i in ("naive", "torch", "liger") if (m, i) != ("red", "liger")
]


@pytest.mark.parametrize("mode,impl", LOGPROB_PAIRS)
def test_logprob_impls_match_float64(tiny, mode, impl):
    case = cases.Case("logprobs", mode, tiny, 40, impl)
    inp = cases.make_inputs(case)
    got = impls.build(case, inp)()
    want = _grads64(case, inp)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() <= 1e-4 * max(1.0, w.abs().max())


@pytest.mark.parametrize("mode,impl", LOSS_PAIRS)
def test_loss_impls_match_float64(tiny, mode, impl):
    case = cases.Case("loss", mode, tiny, 96, impl)  # B = 2 sequences of 48; one is a teacher trace
    inp = cases.make_inputs(case)
    assert bool(inp["offline_mask"].any()) == (mode == "red")
    got = impls.build(case, inp)()
    x = inp["hidden"].detach().double().requires_grad_()
    w = inp["weight"].detach().double().requires_grad_()
    cfg = dict(impls.LOSS_CONFIGS[mode])
    loss = reference_loss(
        x,
        w,
        inp["targets"],
        inp["advantages"],
        inp["loss_mask"],
        old=inp["old_logprobs"],
        offline=inp["offline_mask"] if mode == "red" else None,
        r_bar=inp["group_accuracy"],
        w=inp["offline_weight"],
        **cfg,
    )
    loss.backward()
    assert float(got[0].detach()) == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
    for g, ref in zip(got[-2:], (x.grad, w.grad)):
        assert (g.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_liger_flsce_reports_its_path_on_cpu():
    # Liger dispatches to CuTe on Hopper only; on CPU its scaled CE is the PyTorch fallback (what the CPU rows ran)
    assert impls.liger_flsce_path("cpu") == "fallback (PyTorch)"
