"""TRL's GRPOTrainer with red_kernels computing every per-token log-prob and entropy from hidden states.

`REDKernelsGRPOTrainer` is `trl.GRPOTrainer` (same constructor, same `GRPOConfig`). TRL 1.16 gives the policy
(and the reference model) a fused LM head: `model(..., labels=labels, fused_lm_head=True)` returns per-token
`log_probs` / `entropy` instead of logits, and every pass of the trainer (policy, old policy, reference — with
PEFT the reference is the policy with its adapter off) goes through that call. This subclass wraps that call once
more, so that with `fused_lm_head=True` the backbone's last hidden states go straight into
`red_kernels.linear_logprobs`; everything else — generation, rewards, advantages, every `loss_type`, the
importance-sampling correction, the entropy bonus, entropy masking and metrics — is TRL's own code, unchanged.

Handled like TRL: PEFT (the head is added to the base model), FSDP2 (a DTensor lm_head is gathered with
`full_tensor()`), `cast_lm_head_to_fp32`, autocast, pre-shifted `shift_labels`, a model split across devices,
`final_logit_softcapping` / logit scales read from the config. Refused with an error: DeepSpeed ZeRO-3 (the
kernel's backward re-reads the lm_head weight outside any parameter gather), the MoE load-balancing aux loss, and
softcap / logit scale while the installed red_kernels lacks them.
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import nullcontext

import torch
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from red_kernels import linear_logprobs

__all__ = ["REDKernelsGRPOTrainer", "add_red_lm_head", "logit_transform"]


def logit_transform(config) -> tuple[float | None, float]:
    """(softcap, logit_scale) a causal-LM config applies to its logits: z = softcap·tanh(s·x·Wᵀ/softcap).

    Same attributes TRL 1.16 reads: `final_logit_softcapping` (Gemma 2/3); the scale from `logit_scale` (Cohere),
    else `output_multiplier`, else `lm_head_multiplier` (Falcon-H1), else 1/`logits_scaling` (Granite, MiniCPM3;
    HyperCLOVA X multiplies by it). A missing or None scale means 1.0.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            return softcap, float(scale)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        return softcap, float(
            divisor if getattr(config, "model_type", None) == "hyperclovax" else 1 / divisor
        )
    return softcap, 1.0


def _transform_kwargs(config) -> dict:
    """linear_logprobs keywords for the config's softcap / logit scale (only the non-default ones)."""
    softcap, scale = logit_transform(config)
    extra = {k: v for k, v in (("softcap", softcap), ("logit_scale", scale)) if v not in (None, 1.0)}
    missing = set(extra) - set(inspect.signature(linear_logprobs).parameters)
    if missing:
        raise NotImplementedError(
            f"{type(config).__name__} scales its logits ({extra}) but the installed red_kernels.linear_logprobs "
            f"has no {sorted(missing)} argument; upgrade red-kernels, or use trl.GRPOTrainer for this model."
        )
    return extra


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def add_red_lm_head(
    model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False, return_entropy: bool = True
) -> None:
    """Route `model(..., labels=labels, fused_lm_head=True)` through red_kernels.linear_logprobs.

    `model` is a transformers causal LM that TRL's `add_fused_lm_head` already patched; calls without
    `fused_lm_head=True` (generation, plain forward) go to that forward unchanged. The fused call runs the
    backbone, scores the next-token labels (`-100` = not scored) of positions 0..T-2 (or `shift_labels` as given)
    and returns a `trl.trainer.utils.FusedCausalLMOutput` with `log_probs` and `entropy` [B, T-1] in fp32, zero at
    ignored labels, differentiable through both, plus `loss` (mean NLL, or the sum over `num_items_in_batch`)
    and `label_mask`. Logits are (x·Wᵀ + b)/temperature, softcapped / scaled as the config asks.
    """
    if _zero3_enabled():
        raise NotImplementedError(
            "REDKernelsGRPOTrainer does not support DeepSpeed ZeRO-3: red_kernels' backward "
            "re-reads the lm_head weight outside a parameter gather. Use ZeRO-1/2 or FSDP2."
        )
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise NotImplementedError(
            "REDKernelsGRPOTrainer does not compute the MoE load-balancing loss: set "
            "`output_router_logits=False` in the model config or use trl.GRPOTrainer."
        )
    extra = _transform_kwargs(text_config)
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            return previous(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        if kwargs.get("output_router_logits"):
            raise NotImplementedError(
                "REDKernelsGRPOTrainer: the MoE aux loss (router_aux_loss_coef) is not "
                "supported; set router_aux_loss_coef=0.0 in GRPOConfig."
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # looked up per call: PEFT/FSDP swap it
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        dev = hidden.device.type
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        else:
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext():
            logp, ent = linear_logprobs(
                hidden.to(dtype),
                weight.to(dtype),
                labels,
                bias=None if bias is None else bias.to(dtype),
                temperature=temperature,
                return_entropy=return_entropy,
                **extra,
            )
        mask = labels != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / count, log_probs=logp, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)


class REDKernelsGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose log-probs and entropies (policy, old policy, reference) come from red_kernels.

    Same arguments as `trl.GRPOTrainer`; see this module's docstring for what is handled and what is refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model

        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        fp32 = self.args.cast_lm_head_to_fp32
        add_red_lm_head(policy, self.temperature, fp32, return_entropy=True)
        if self.ref_model is not None:
            add_red_lm_head(self.ref_model, self.temperature, fp32, return_entropy=False)
