"""Cheap check that a trainer → engine weight sync took effect (trainer.md pain #1: silently stale weights).

The check runs one short probe sequence through both sides and compares the per-token log-probs: the trainer's
come from red_kernels.linear_logprobs on the model's last hidden states and lm_head weight, the engine's from
its own prefill (`engine.prompt_logprobs`). A missed parameter, a stale tied head or weights written before a
wake-up show up as a difference far above the numerical noise of the two implementations (fp32: ~1e-5;
bf16 engines: ~1e-2, so pass a looser `atol` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from red_kernels import linear_logprobs


@torch.no_grad()
def trainer_logprobs(model, token_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len(token_ids) − 1] float32 log-probs of token t given tokens < t under an HF causal LM.

    Uses the decoder's last hidden state (after the final norm) and the output embedding, like the loss does.
    """
    device = model.get_output_embeddings().weight.device
    ids = torch.tensor([token_ids], device=device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    weight = head.weight
    logp, _ = linear_logprobs(
        hidden.to(weight.dtype),
        weight,
        ids[0, 1:],
        bias=head.bias,
        temperature=temperature,
        return_entropy=False,
    )
    return logp.float().cpu()


@dataclass
class SyncReport:
    """Result of `verify_weight_sync`: max/mean |engine − trainer| log-prob over the probe, and ok = max ≤ atol."""

    max_abs_diff: float
    mean_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def verify_weight_sync(
    engine, model, probe_ids: list[int], atol: float = 1e-3, raise_on_error: bool = False
) -> SyncReport:
    """Compare the engine's and the trainer's log-probs of `probe_ids` (a few dozen tokens are plenty)."""
    if len(probe_ids) < 2:
        raise ValueError("probe needs at least 2 tokens")
    diff = (engine.prompt_logprobs(list(probe_ids)) - trainer_logprobs(model, list(probe_ids))).abs()
    report = SyncReport(float(diff.max()), float(diff.mean()), float(atol))
    if raise_on_error and not report.ok:
        raise RuntimeError(
            f"weight sync check failed: engine and trainer log-probs differ by up to "
            f"{report.max_abs_diff:.3g} (atol {atol:.3g})"
        )
    return report


def engine_weights(model):
    """(name, full tensor) for every parameter, in named_parameters order (the same on every rank): FSDP2
    shards are gathered with `full_tensor()` one parameter at a time, so no full copy of the model is held."""
    for name, p in model.named_parameters():
        t = p.detach()
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t
