"""The implementations under test, each built into a `run()` closure that does one timed step.

naive: materialised logits + log_softmax + gather + entropy (what verl-style code does), then the same
per-token loss math as red_loss. torch / triton: red_kernels backends. liger: Liger-Kernel's fused linear CE
(reduction='none', log-probs only) and LigerFusedLinearGRPOLoss (eager, compiled=False). trl: TRL 1.16's
trl.kernels.ChunkedLogProbFunction (log-probs + differentiable entropy; Triton fold on GPU, torch ops on CPU).
liger_flsce: LigerFusedLinearScaledCrossEntropyFunction with return_entropy=True (CuTe on Hopper, else a PyTorch
fallback; liger_flsce_path says which).

run() returns the tensors the step produces (outputs and gradients), so that measure.py can subtract them from
the peak memory.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .cases import Case

CLIP_LOW, CLIP_HIGH, R_MIN = 0.2, 0.28, 1 / 16
LOSS_CONFIGS = {  # red_loss keyword overrides per loss mode
    "red": {
        "offline_shaping": "accuracy_shift",
        "loss_agg": "seq_sum_const",
        "clip_eps_low": CLIP_LOW,
        "clip_eps_high": CLIP_HIGH,
        "r_min": R_MIN,
    },
    "grpo": {
        "offline_shaping": "none",
        "loss_agg": "token_mean",
        "clip_eps_low": CLIP_LOW,
        "clip_eps_high": CLIP_HIGH,
    },
}


def available(case: Case) -> tuple[bool, str]:
    """(usable, reason if not) for this case on this machine."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    if case.impl == "triton" and case.device != "cuda":
        return False, "the Triton backend is benchmarked on a GPU only"
    if case.impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return False, "liger-kernel is not installed"
        if case.op == "logprobs" and case.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Liger's fused linear CE needs TRITON_INTERPRET=1 on CPU"
    if case.impl == "trl":
        for mod in ("trl", "transformers"):  # trl.kernels imports transformers.utils
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed (pip install 'red-kernels[trl]')"
    if case.impl == "liger_flsce" and importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed"
    if case.op == "loss" and case.impl in ("torch", "triton"):
        import red_kernels

        if not hasattr(red_kernels, "red_loss"):
            return False, "red_kernels.red_loss is not available yet"
    return True, ""


def liger_flsce_path(device: str) -> str:
    """Which implementation LigerFusedLinearScaledCrossEntropyFunction dispatches to on `device`."""
    try:
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as flsce

        fn = flsce._resolve_implementation(torch.device(device))
    except Exception as e:  # noqa: BLE001 — e.g. the CuTe DSL missing on a Hopper image
        return f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    return "fallback (PyTorch)" if fn is flsce._FusedLinearPPOFallbackFunction else f"CuTe ({fn.__name__})"


# ---------------- naive PyTorch implementations (materialised logits): timing peers, checked against the one
# ---------------- float64 reference (red_kernels.reference) in tests/bench/test_bench_cases.py


def naive_logprobs(hidden, weight, targets, return_entropy=True, entropy_grad=True):
    """log p(targets) and entropy, fp32 [N], from full [N, V] logits (entropy detached if not entropy_grad)."""
    logits = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    del logits
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = None
    if return_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def naive_red_loss(
    hidden,
    weight,
    targets,
    advantages,
    loss_mask,
    old_logprobs,
    offline_mask,
    group_accuracy,
    offline_weight,
    *,
    offline_shaping,
    loss_agg,
    clip_eps_low,
    clip_eps_high,
    r_min=R_MIN,
):
    """The RED / GRPO loss of red-algorithm.md steps 7–8 over materialised logits. Returns (loss, logp, entropy)."""
    b, t, h = hidden.shape
    # the entropy is a logged metric (no entropy bonus), as red_loss returns it: no gradient through it
    logp, ent = naive_logprobs(hidden.reshape(-1, h), weight, targets.reshape(-1), entropy_grad=False)
    logp, ent = logp.view(b, t), ent.view(b, t)
    m = loss_mask.float()
    off = offline_mask.float() if offline_mask is not None else torch.zeros_like(m)
    on = m * (1 - off)
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logprobs)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv)
    p = logp.exp()
    if offline_shaping == "accuracy_shift":
        r = group_accuracy.clamp(r_min, 1 - r_min)[:, None]
        phi = p / (r + (1 - r) * p)
    else:
        phi = p
    per_tok = (on * pg - off * phi * offline_weight[:, None] * adv) * m
    if loss_agg == "token_mean":
        loss = per_tok.sum() / m.sum().clamp(min=1)
    else:  # seq_sum_const with C = T
        loss = per_tok.sum() / (t * b)
    return loss, logp.detach(), ent


# ---------------------------------------------------------------- run() builders


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(case: Case, inp: dict):
    """A closure doing one step of `case` on inputs from cases.make_inputs."""
    builder = _build_logprobs if case.op == "logprobs" else _build_loss
    step = builder(case, inp)
    x, w = inp["hidden"], inp["weight"]

    def reset():
        x.grad = None
        w.grad = None

    def run():
        reset()
        out = step()
        _sync(case.device)
        grads = (x.grad, w.grad) if case.mode != "fwd" else ()
        return tuple(out) + grads

    run.reset = reset
    return run


def _build_logprobs(case, inp):
    x, w, y, g_lp, g_h = (inp[k] for k in ("hidden", "weight", "targets", "g_lp", "g_h"))
    with_ent = case.mode != "fwdbwd_noent"
    if case.impl == "naive":

        def forward():
            return naive_logprobs(x, w, y, return_entropy=with_ent)
    elif case.impl in ("torch", "triton"):
        from red_kernels import linear_logprobs

        def forward():
            return linear_logprobs(x, w, y, return_entropy=with_ent, backend=case.impl)
    elif case.impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def forward():
            return -ce(w, x, y), None  # per-token NLL -> log p; no entropy
    elif case.impl == "trl":
        from trl.kernels import ChunkedLogProbFunction

        fields = ("log_probs", "entropy") if with_ent else ("log_probs",)

        def forward():  # (hidden, weight, bias, targets, temperature, vocab chunk, softcap, logit scale, outputs)
            logp, ent, *_ = ChunkedLogProbFunction.apply(x, w, None, y, 1.0, 32768, None, 1.0, fields)
            return logp, ent
    elif case.impl == "liger_flsce":
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as flsce

        def forward():
            out = flsce.apply(x, w, y, 1.0, -100, 1, with_ent)
            nll, ent = out if with_ent else (out, None)
            return -nll, ent
    else:
        raise ValueError(case.impl)

    def step():
        logp, ent = forward()
        if case.mode != "fwd":
            obj = (logp * g_lp).sum()
            if ent is not None:
                obj = obj + (ent * g_h).sum()
            obj.backward()
        return tuple(t for t in (logp, ent) if t is not None)

    return step


def _build_loss(case, inp):
    cfg = LOSS_CONFIGS[case.mode]
    offline = inp["offline_mask"] if case.mode == "red" else None
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["advantages"])
    if case.impl == "naive":

        def forward():
            return naive_red_loss(
                *args,
                inp["loss_mask"],
                inp["old_logprobs"],
                offline,
                inp["group_accuracy"],
                inp["offline_weight"],
                **cfg,
            )
    elif case.impl in ("torch", "triton"):
        from red_kernels import red_loss

        def forward():
            out = red_loss(
                *args,
                loss_mask=inp["loss_mask"],
                old_logprobs=inp["old_logprobs"],
                offline_mask=offline,
                group_accuracy=inp["group_accuracy"],
                offline_weight=inp["offline_weight"],
                backend=case.impl,
                **cfg,
            )
            return out.loss, out.logprobs, out.entropy
    elif case.impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        assert case.mode == "grpo", "Liger has no RED loss"
        grpo = LigerFusedLinearGRPOLoss(
            beta=0.0,
            compiled=False,
            use_ref_model=False,
            epsilon_low=CLIP_LOW,
            epsilon_high=CLIP_HIGH,
            loss_type="dapo",
        )
        mask = inp["loss_mask"].float()

        def forward():
            loss, _metrics = grpo(*args[:3], mask, args[3], old_per_token_logps=inp["old_logprobs"])
            return (loss,)
    else:
        raise ValueError(case.impl)

    def step():
        out = forward()
        out[0].backward()
        return out

    return step
