"""TRL's GRPOTrainer / SFTTrainer with red_kernels computing every per-token log-prob and entropy from hidden states.

`REDKernelsGRPOTrainer` is `trl.GRPOTrainer` (same constructor, same `GRPOConfig`). TRL 1.16 gives the policy
(and the reference model) a fused LM head: `model(..., labels=labels, fused_lm_head=True)` returns per-token
`log_probs` / `entropy` instead of logits, and every pass of the trainer (policy, old policy, reference — with
PEFT the reference is the policy with its adapter off) goes through that call. This subclass wraps that call once
more, so that with `fused_lm_head=True` the backbone's last hidden states go straight into
`red_kernels.linear_logprobs`; everything else — generation, rewards, advantages, every `loss_type` (grpo, dr_grpo,
dapo, bnpo, cispo, sapo, luspo, vespo) at either `importance_sampling_level`, clipping (`epsilon_high`, `delta`),
the vLLM importance-sampling correction, the off-policy mask, KL with bias correction, the entropy bonus (static or
adaptive), entropy masking and metrics — is TRL's own code, unchanged (tests/integrations/test_trl_parity.py).
`REDKernelsSFTTrainer` does the same for `trl.SFTTrainer` (loss, `entropy` and `mean_token_accuracy`).

Handled like TRL: PEFT (the head is added to the base model), FSDP2 (a DTensor lm_head is gathered with
`full_tensor()`), `cast_lm_head_to_fp32`, autocast, pre-shifted `shift_labels`, a model split across devices,
`final_logit_softcapping` / logit scales read from the config, the MoE load-balancing loss (router logits requested
as the config asks, `load_balancing_loss_func` weighted by the config's `router_aux_loss_coef`, returned as
`aux_loss`). Refused at construction, before any model is loaded: DeepSpeed ZeRO-3. TRL gathers the partitioned
head around its kernel's forward and again inside its backward; red_kernels' autograd function re-reads the weight
in its backward outside any gather, and DeepSpeed cannot be installed or exercised in this project's test
environment, so a gather we cannot test is not offered. Use ZeRO-1/2 or FSDP2 (tested, 2 processes).
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import nullcontext

import torch
from trl import GRPOTrainer, SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from red_kernels import linear_logprobs

__all__ = ["REDKernelsGRPOTrainer", "REDKernelsSFTTrainer", "add_red_lm_head", "logit_transform"]


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


def _zero3_enabled(args=None) -> bool:
    """DeepSpeed ZeRO-3, as `args` (TrainingArguments) configure it, or as transformers has registered it."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return True
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _refuse_zero3(args=None) -> None:
    if _zero3_enabled(args):
        raise NotImplementedError(
            "red_kernels' TRL integration does not support DeepSpeed ZeRO-3: TRL gathers the partitioned lm_head "
            "around its fused kernel and again in its backward, while red_kernels' backward re-reads the weight "
            "outside any gather, and DeepSpeed is not exercised by red_kernels' tests. Use ZeRO-1/2 or FSDP2, "
            "or trl.GRPOTrainer / trl.SFTTrainer for ZeRO-3."
        )


# Per-token fields of trl's FusedCausalLMOutput: the first two come from linear_logprobs (differentiable), the others
# from one extra no-grad sweep over the vocabulary (`_extra_fields`), only when asked for.
OUTPUTS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


def _moe_aux_loss(model, text_config, router_logits, attention_mask):
    """The MoE load-balancing loss over the backbone's router logits (transformers' Mixtral function, which
    every MoE family shares), with the config's expert counts."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    if experts is None:
        experts = model.num_experts
    return load_balancing_loss_func(router_logits, experts, text_config.num_experts_per_tok, attention_mask)


@torch.no_grad()
def _extra_fields(x, w, b, y, temperature, softcap, logit_scale, fields, rows=None):
    """is_top1 / mean_logits / log_sum_sq_probs of compacted rows x [M, H], labels y [M] (fp32 statistics of
    z = softcap·tanh(s·(x·Wᵀ+b)/softcap)/τ, [rows, V] blocks at a time). is_top1: y is the first maximum."""
    n, vocab = x.shape[0], w.shape[0]
    rows = rows or max(1, (1 << 24) // max(1, vocab))
    out = {
        f: torch.empty(n, dtype=torch.bool if f == "is_top1" else torch.float32, device=x.device)
        for f in fields
    }
    for i in range(0, n, rows):
        z = x[i : i + rows].float() @ w.float().t()
        if b is not None:
            z += b.float()
        z *= logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z /= temperature
        if "is_top1" in fields:
            out["is_top1"][i : i + rows] = z.argmax(-1) == y[i : i + rows]
        if "mean_logits" in fields:
            out["mean_logits"][i : i + rows] = z.mean(-1)
        if "log_sum_sq_probs" in fields:
            out["log_sum_sq_probs"][i : i + rows] = torch.logsumexp(2 * z.log_softmax(-1), -1)
    return out


def add_red_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    return_entropy: bool = True,
    outputs: tuple[str, ...] | None = None,
    top_k: int | None = None,
) -> None:
    """Route `model(..., labels=labels, fused_lm_head=True)` through red_kernels.linear_logprobs.

    `model` is a transformers causal LM that TRL's `add_fused_lm_head` already patched; calls without
    `fused_lm_head=True` (generation, plain forward) go to that forward unchanged. The fused call runs the
    backbone, scores the next-token labels (`-100` = not scored) of positions 0..T-2 (or `shift_labels` as given)
    and returns a `trl.trainer.utils.FusedCausalLMOutput` with `log_probs` and `entropy` [B, T-1] in fp32, zero at
    ignored labels, differentiable through both, plus `loss` (mean NLL, or the sum over `num_items_in_batch`, plus
    the weighted MoE aux loss when router logits are requested), `label_mask` and `aux_loss`. Logits are
    (x·Wᵀ + b)/temperature, softcapped / scaled as the config asks.

    outputs: the per-token fields to compute, among `OUTPUTS` (default: log_probs, and entropy when
    `return_entropy`). `is_top1` (SFTTrainer's token accuracy), `mean_logits` and `log_sum_sq_probs` cost one more
    no-grad sweep of the head over the scored rows; fields not asked for are None, as with TRL.
    top_k: None (TRL's full softmax), or k: log_probs and entropy of the top-k truncated, renormalised
    distribution (`linear_logprobs(top_k=k)`), the one a top-k sampler draws from; the extra fields stay
    full-vocabulary statistics.
    """
    if outputs is None:
        outputs = ("log_probs", "entropy") if return_entropy else ("log_probs",)
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {sorted(unknown)}; choose among {OUTPUTS}")
    _refuse_zero3()
    text_config = model.config.get_text_config()
    extra = _transform_kwargs(text_config)
    op_kwargs = extra if top_k is None else {**extra, "top_k": top_k}
    extra_fields = tuple(f for f in OUTPUTS[2:] if f in outputs)
    want_entropy = "entropy" in outputs
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
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):  # as the model's own forward does
            kwargs.setdefault("output_router_logits", True)
        backbone = self.base_model(*args, **kwargs)  # looked up per call: PEFT/FSDP swap it
        hidden = backbone.last_hidden_state
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
        x, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext():
            logp, ent = linear_logprobs(
                x,
                w,
                labels,
                bias=b,
                temperature=temperature,
                return_entropy=want_entropy,
                **op_kwargs,
            )
        mask = labels != -100
        fields = {}
        if extra_fields:
            stats = _extra_fields(
                x[mask],
                w,
                b,
                labels[mask],
                temperature,
                extra.get("softcap"),
                extra.get("logit_scale", 1.0),
                extra_fields,
            )
            for f, v in stats.items():
                fields[f] = v.new_zeros(mask.shape).masked_scatter(mask, v)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -logp.sum() / count
        aux = None
        if kwargs.get("output_router_logits"):
            aux = _moe_aux_loss(self, text_config, backbone.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux
        return FusedCausalLMOutput(
            loss=loss, log_probs=logp, entropy=ent, label_mask=mask, aux_loss=aux, **fields
        )

    model.forward = types.MethodType(forward, model)


def _policy(trainer):
    from accelerate.utils import is_peft_model

    return trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model


def _truncation(args, truncated_logprobs: bool) -> int | None:
    """The top-k the trainer scores with: None (TRL's full softmax) unless truncated_logprobs, which needs a
    top-k-only sampler (GRPOConfig top_k > 0, top_p = 1, no min_p)."""
    if not truncated_logprobs:
        return None
    if (args.top_k or 0) <= 0 or args.top_p < 1.0 or args.min_p:
        raise ValueError(
            "truncated_logprobs=True scores the top-k distribution the sampler draws from: it needs GRPOConfig "
            f"top_k > 0 with top_p=1.0 and min_p=None (got top_k={args.top_k}, top_p={args.top_p}, "
            f"min_p={args.min_p}); top-p / min-p truncation has no exact kernel (see linear_logprobs' top_k)."
        )
    return int(args.top_k)


class REDKernelsGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose log-probs and entropies (policy, old policy, reference) come from red_kernels.

    Same arguments as `trl.GRPOTrainer`, plus `truncated_logprobs` (default False: TRL's numbers, the full
    softmax). With True and a top-k sampler (GRPOConfig top_k = k > 0, top_p = 1), every pass — policy, old
    policy, reference — scores the top-k truncated, renormalised distribution the rollouts were drawn from, so
    the vLLM importance-sampling ratio, the PPO ratio, the KL and the entropies compare like with like (TRL's
    own ratio is then biased by the truncated mass, trl#6789). See this module's docstring for the rest.
    """

    def __init__(self, *args, truncated_logprobs: bool = False, **kwargs):
        _refuse_zero3(kwargs.get("args"))
        super().__init__(*args, **kwargs)
        top_k = _truncation(self.args, truncated_logprobs)
        fp32 = self.args.cast_lm_head_to_fp32
        add_red_lm_head(_policy(self), self.temperature, fp32, outputs=("log_probs", "entropy"), top_k=top_k)
        if self.ref_model is not None:
            add_red_lm_head(self.ref_model, self.temperature, fp32, outputs=("log_probs",), top_k=top_k)


class REDKernelsSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss, `entropy` and `mean_token_accuracy` come from red_kernels (the fused head TRL
    asks for: log_probs, entropy, is_top1). Same arguments as `trl.SFTTrainer`."""

    def __init__(self, *args, **kwargs):
        _refuse_zero3(kwargs.get("args"))
        super().__init__(*args, **kwargs)
        add_red_lm_head(_policy(self), outputs=("log_probs", "entropy", "is_top1"))
