"""What the benchmarks measure: model shapes, token counts per device, inputs and FLOP counts.

A Case is one (op, mode, model, tokens, impl) point. FLOPs count 2·N·H·V per GEMM-shaped sweep over the
vocabulary that the implementation actually performs (GEMMS below), as kernels.md asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# name -> (hidden size H, vocabulary V) of the lm_head
MODELS = {
    "smollm2-135m": (576, 49_152),
    "qwen2.5-0.5b": (896, 151_936),
    "qwen2.5-1.5b": (1536, 151_936),
}

# linear_logprobs: forward only; forward+backward with upstream grads into log p and entropy; the same without
# entropy. loss: forward+backward of the RED loss (teacher tokens, accuracy-aware shift) or of a plain clipped
# GRPO/DAPO loss (token mean, the configuration Liger's GRPO loss also computes).
MODES = {"logprobs": ("fwd", "fwdbwd", "fwdbwd_noent"), "loss": ("red", "grpo")}

IMPLS = ("naive", "torch", "triton", "liger", "trl", "liger_flsce")
# The peers a user already has for log-probs + entropy from hidden states (linear_logprobs cases only): TRL 1.16's
# chunked fused LM head (trl.kernels.ChunkedLogProbFunction) and Liger's fused linear scaled CE with entropy.
PEERS = ("trl", "liger_flsce")

# GEMM sweeps [N,H]x[H,V] performed. naive: z, then dX and dW from the stored logits. torch/triton linear_logprobs:
# forward, then backward recomputes z (recompute + dX + dW). red_loss forms the gradient during its one forward
# sweep (z, dX, dW) on the torch backend; its Triton backend runs the forward kernel and then the recompute
# backward kernel (4). Liger fused linear CE likewise computes gradients in forward (3); Liger's GRPO loss runs its
# selective log-prob forward, then autograd recomputes z in backward (4). TRL's chunked function and Liger's
# scaled-CE fallback recompute each logits tile in backward (4); Liger's CuTe path is counted the same.
GEMMS = {
    ("logprobs", "fwd"): {"naive": 1, "torch": 1, "triton": 1, "liger": 1, "trl": 1, "liger_flsce": 1},
    ("logprobs", "bwd"): {"naive": 3, "torch": 4, "triton": 4, "liger": 3, "trl": 4, "liger_flsce": 4},
    ("loss", "bwd"): {"naive": 3, "torch": 3, "triton": 4, "liger": 4},
}

SEQ_LEN = 512  # positions per sequence in the loss cases (B = tokens / SEQ_LEN)
GROUP = 8  # RED groups: 7 online samples + 1 teacher trace
PEAK_TFLOPS = 800.0  # H100 dense bf16, measured (kernels.md)
CPU_GFLOPS_PER_THREAD = (
    75.0  # rough fp32 GEMM rate of one dev-machine core, only to choose the number of rounds
)
# CPU side-by-side with the peers: N per case (fp32, 1 thread: ~10-30 s per call at 1.5B); BENCH_PEER_TOKENS sets it
PEER_TOKENS = int(os.environ.get("BENCH_PEER_TOKENS", "512"))

# Device the suite runs on: BENCH_DEVICE=cpu|cuda, else CUDA when available.
DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Case:
    op: str  # 'logprobs' | 'loss'
    mode: str  # see MODES
    model: str  # key of MODELS
    tokens: int  # N rows that reach the GEMMs
    impl: str  # see IMPLS
    device: str = "cpu"

    @property
    def hidden(self) -> int:
        return MODELS[self.model][0]

    @property
    def vocab(self) -> int:
        return MODELS[self.model][1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    @property
    def group(self) -> str:
        return f"{self.op} {self.mode} {self.model} N={self.tokens}"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode}-{self.model}-N{self.tokens}-{self.impl}"

    @property
    def gemms(self) -> int:
        kind = "fwd" if self.mode == "fwd" else "bwd"
        return GEMMS[(self.op, kind)][self.impl]

    @property
    def flop(self) -> float:
        return 2.0 * self.tokens * self.hidden * self.vocab * self.gemms

    def __str__(self) -> str:
        return self.id


def _grid(op, modes, model, tokens, impls, device):
    return [Case(op, m, model, tokens, i, device) for m in modes for i in impls]


def cpu_cases(op: str) -> list[Case]:
    """fp32 on a 2-core CPU: the headline shape (Qwen2.5-0.5B, 4096 tokens) plus two cheap ones; ~5 min in all.
    The side-by-side with TRL and Liger's scaled CE (forward+backward with entropy, Qwen2.5-0.5B and 1.5B at
    PEER_TOKENS) adds ~3 min on 1 thread; select it alone with `-k "fwdbwd-qwen2.5 and N512"`.

    Liger's fused linear CE is a Triton kernel, so on CPU it runs in Triton's interpreter (not a speed
    reference): one small case only. Liger's GRPO loss is plain PyTorch on CPU, a fair peer.
    """
    if op == "logprobs":  # (de-duplicated: BENCH_PEER_TOKENS=1024 overlaps the 1.5B naive/torch cases)
        return list(
            dict.fromkeys(
                _grid(op, MODES[op], "qwen2.5-0.5b", 4096, ("naive", "torch"), "cpu")
                + _grid(op, MODES[op], "smollm2-135m", 1024, ("naive", "torch"), "cpu")
                + [Case(op, "fwdbwd_noent", "smollm2-135m", 1024, "liger", "cpu")]
                + _grid(op, ("fwdbwd",), "qwen2.5-1.5b", 1024, ("naive", "torch"), "cpu")
                + [
                    Case(op, "fwdbwd", m, PEER_TOKENS, i, "cpu")
                    for m in ("qwen2.5-0.5b", "qwen2.5-1.5b")
                    for i in ("naive", "torch") + PEERS
                ]
            )
        )
    return (
        _grid(op, ("red",), "qwen2.5-0.5b", 4096, ("naive", "torch"), "cpu")
        + _grid(op, ("grpo",), "qwen2.5-0.5b", 4096, ("naive", "torch", "liger"), "cpu")
        + _grid(op, ("red",), "smollm2-135m", 1024, ("naive", "torch"), "cpu")
        + _grid(op, ("grpo",), "smollm2-135m", 1024, ("naive", "torch", "liger"), "cpu")
    )


def gpu_cases(op: str) -> list[Case]:
    """bf16 on one GPU: every model at 16,384 tokens, Qwen2.5-0.5B also at 4096. Liger runs where installed."""
    impls = ("naive", "torch", "triton", "liger") + PEERS
    points = [(m, 16_384) for m in MODELS] + [("qwen2.5-0.5b", 4096)]
    out = []
    for model, n in points:
        for mode in MODES[op]:
            for impl in impls:
                if op == "logprobs" and impl == "liger" and mode == "fwdbwd":
                    continue  # Liger's CE has no entropy output
                if op == "loss" and impl in PEERS:
                    continue  # log-prob peers, no policy loss
                if op == "loss" and impl == "liger" and mode == "red":
                    continue  # Liger has no RED / offline loss
                out.append(Case(op, mode, model, n, impl, "cuda"))
    return out


def cases_for(op: str, device: str) -> list[Case]:
    return cpu_cases(op) if device == "cpu" else gpu_cases(op)


def schedule(case: Case) -> tuple[int, int]:
    """(warmup calls, timed rounds): one cold round for CPU cases of more than ~4 s (every CPU case with
    BENCH_CPU_COLD=1, for a loaded machine), else 1 + 3; 2 + 10 on GPU."""
    if case.device == "cuda":
        return 2, 10
    est_s = case.flop / (CPU_GFLOPS_PER_THREAD * torch.get_num_threads() * 1e9)
    slow = (
        os.environ.get("BENCH_CPU_COLD") == "1"
        or est_s > 4
        or (case.impl == "liger" and case.op == "logprobs")
    )
    return (0, 1) if slow else (1, 3)


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random inputs on case.device in case.dtype. Differentiable leaves (hidden, weight) require grad unless the
    mode is forward-only. logprobs: hidden [N,H]; loss: hidden [B,T,H] with B = N/SEQ_LEN."""
    g = torch.Generator(device=case.device).manual_seed(seed)
    dev = case.device
    n, h, v = case.tokens, case.hidden, case.vocab
    grad = case.mode != "fwd"

    def leaf(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=dev).mul_(scale).to(case.dtype)
        return t.requires_grad_(grad)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=dev)

    weight = leaf(v, h, scale=h**-0.5 * 2)  # logits of std ~2: a peaked, realistic softmax
    if case.op == "logprobs":
        return {
            "hidden": leaf(n, h),
            "weight": weight,
            "targets": torch.randint(0, v, (n,), generator=g, device=dev),
            "g_lp": randn(n),  # upstream ∂L/∂log p
            "g_h": randn(n) * 0.1,  # upstream ∂L/∂H
        }
    b, t = max(1, n // SEQ_LEN), min(n, SEQ_LEN)
    offline = torch.zeros(b, t, dtype=torch.bool, device=dev)
    if case.mode == "red":
        offline[min(GROUP, b) - 1 :: GROUP] = True  # the last member of each group is the teacher trace
    return {
        "hidden": leaf(b, t, h),
        "weight": weight,
        "targets": torch.randint(0, v, (b, t), generator=g, device=dev),
        "advantages": randn(b),
        "loss_mask": torch.ones(b, t, dtype=torch.bool, device=dev),
        "old_logprobs": rand(b, t) * -8,
        "offline_mask": offline,
        "group_accuracy": rand(b),
        "offline_weight": 1 + rand(b),
    }
