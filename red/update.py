"""The model passes and the optimizer step: old-policy pass, policy update (loss, gradient sync, clip, AdamW).

The model is only run as its body (`model.base_model`: embeddings + layers + final norm); log-probs, entropies
and the loss come from red_kernels with the lm_head weight, so full-vocabulary logits are never materialised.
Both passes run *inside the forward of the wrapped module* (forward redirection): the fused loss reads
`lm_head.weight` outside the HF forward, and only a call through the wrapper lets DDP prepare its gradient
reduction and FSDP2 unshard (and later reduce-scatter) the parameters it touches.

Precision: parameters and AdamW state are float32 (the master copy); forward/backward run under
`torch.autocast` in model.dtype (float16 adds a GradScaler), or, under FSDP2, with
MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=float32). red_kernels accumulates dW in float32 and
keeps its own precision under autocast (it turns autocast off inside itself), so the kernels run inside it.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import parallel
from .plan import Plan
from .records import RolloutBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUM_KEYS = ("pg_online", "pg_offline", "sft", "entropy_bonus", "kl")
OFFLINE_MEANS = ("teacher_prob", "phi_mean", "entropy_offline")  # token means over teacher tokens


class Policy:
    """The trained model as the passes see it: the HF model (float32 parameters), the module the passes call
    (itself, DDP or FSDP2), the compute dtype and, for float16, the GradScaler."""

    packing = (
        "off"  # micro-batch layout (red/packing.py): off | rows | flat | shared; red.attention.packing_layout
    )
    row_tokens = None  # layout "shared": the widest row (red.attention.shared_row_tokens); None: the budget
    skipped_updates = 0  # optimizer steps skipped for a non-finite loss or gradient (red/loop.py reads it)
    trimmer = None  # red.host_memory.HeapTrimmer called after each micro-batch of the update (CPU), or None

    def __init__(self, model, dtype: str = "float32", parallel_kind: str = "ddp", pad_id: int = 0):
        self.model, self.pad_id, self.dtype_name = model, pad_id, dtype
        self.compute = DTYPES[dtype]
        self.wrapped = parallel.wrap(model, parallel_kind, self.compute)
        self.fsdp = parallel.is_fsdp(self.wrapped)
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute == torch.float16 else None

    def precision(self) -> dict:
        c = str(self.compute).removeprefix("torch.")
        return {
            "params": "float32",
            "compute": c,
            "optimizer_state": "float32",
            "grad_reduce": "float32",
            "loss_scaling": self.scaler is not None,
        }

    def _autocast(self):
        if self.compute == torch.float32 or self.fsdp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def call(self, fn):
        """fn() run as the forward of the wrapped module (so the wrapper's hooks fire), under autocast."""
        if self.wrapped is self.model and not self.fsdp:
            with self._autocast():
                return fn()
        saved = self.model.__dict__.get("forward")
        self.model.forward = fn
        try:
            with self._autocast():
                return self.wrapped()
        finally:
            if saved is None:
                del self.model.forward
            else:
                self.model.forward = saved

    def hidden_and_head(self, mb):
        """(hidden [b, L-1, H] ([b, T, H] with hidden_index), lm_head weight, bias) in the compute dtype for a
        micro-batch; call inside `call`."""
        mask = mb.attention_mask
        if mask is not None and mask.dim() == 4 and self.model.config._attn_implementation == "eager":
            # eager adds the mask to the scores: a bool "may attend" mask becomes 0 / dtype-min
            dt = self.compute if self.compute != torch.float32 else self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill(
                ~mask, torch.finfo(dt).min
            )
        out = self.model.base_model(
            input_ids=mb.input_ids,
            attention_mask=mask,
            position_ids=mb.position_ids,
            use_cache=False,
        )
        h = out.last_hidden_state
        if mb.hidden_index is None:  # column t predicts token t + 1
            h = h[:, :-1]
        else:  # prompt sharing: a prompt's last column predicts every member's first token
            h = h.gather(1, mb.hidden_index[..., None].expand(-1, -1, h.shape[-1]))
        head = self.model.get_output_embeddings()
        bias = head.bias.to(h.dtype) if getattr(head, "bias", None) is not None else None
        return h, head.weight.to(h.dtype), bias

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]


def _plan(policy: Policy, batch: RolloutBatch, budget: int, count: int | None) -> Plan:
    """The plan of a whole batch in the policy's layout, padded with dummies to `count` micro-batches."""
    return Plan.build(
        batch,
        budget,
        policy.pad_id,
        policy.packing,
        policy.device,
        counts=None if count is None else (0, count, 0),
        row_tokens=policy.row_tokens,
    )


@torch.no_grad()
def forward_pass(policy: Policy, mbs: list, temperature: float) -> None:
    """One no-grad forward of the policy over the micro-batches `mbs` (eval mode): writes `old_logprobs` and
    `entropy` ([b, L-1] float32, on the device, 0 off the loss tokens) into each, from red_kernels.linear_logprobs.
    """
    from red_kernels import linear_logprobs

    was_training = policy.model.training
    policy.model.eval()
    try:
        for mb in mbs:

            def fn(mb=mb):
                h, w, b = policy.hidden_and_head(mb)  # red_kernels turns autocast off inside itself
                return linear_logprobs(h, w, mb.targets, bias=b, temperature=temperature)

            lp, e = policy.call(fn)
            mb.old_logprobs, mb.entropy = lp.float(), e.float()
    finally:
        policy.model.train(was_training)


def old_policy_pass(
    policy: Policy, batch: RolloutBatch, budget: int, temperature: float, count: int | None = None
) -> RolloutBatch:
    """The batch with old_logprobs and entropy [B, R] (float32, response-aligned): `forward_pass` over the
    batch's own plan, read back. (The trainer's step keeps them in its plan instead: red/step.py.)"""
    plan = _plan(policy, batch, budget, count)
    forward_pass(policy, plan.batches, temperature)
    return batch.replace(old_logprobs=plan.response("old_logprobs"), entropy=plan.response("entropy"))


def update(
    policy: Policy,
    plan: Plan,
    loss_cfg,
    opt,
    grad_clip: float,
    normalizer: float,
    use_old: bool = True,
    between=None,
) -> dict:
    """One optimizer step over this rank's plan: red_loss per micro-batch with the global normaliser
    (sequences or tokens of the whole batch, all ranks), gradients reduced once (last micro-batch), clipped,
    AdamW, gradients freed. Returns this rank's metric sums (reduce them with `finish_metrics`).

    The plan's frozen part (gradient-free sequences, see Plan) runs first, without autograd: its loss terms are
    zero by construction, its log-probs, entropies and metrics are kept as for any other micro-batch.
    use_old=False: on-policy (ρ ≡ 1), the loss takes no old log-probs. A micro-batch without old_logprobs /
    entropy gets the forward's own detached values (computed before the optimizer step, so they are the
    pre-step policy's: exactly what an old-policy pass would give, up to float round-off).
    between(): called once after the plan's frozen and first parts (see Plan, split=True), before the second
    part's forwards; it may set the second part's per-sequence inputs (the offline weight w)."""
    from red_kernels import red_loss

    mbs = plan.batches
    opt.zero_grad(set_to_none=True)
    stats: dict = {}
    policy.model.train()

    def add(k, v):
        stats[k] = stats.get(k, 0.0) + v

    for i, mb in enumerate(mbs):
        if i == plan.n_frozen + plan.n_first and between is not None:
            between()
            between = None
        grad = i >= plan.n_frozen  # the frozen part sends no gradient: no graph, no backward

        def fn(mb=mb):
            h, w, b = policy.hidden_and_head(mb)
            return red_loss(
                h,
                w,
                mb.targets,
                mb.advantages,
                loss_mask=mb.loss_mask,
                old_logprobs=mb.old_logprobs if use_old else None,
                offline_mask=mb.offline_mask,
                group_accuracy=mb.group_accuracy,
                offline_weight=mb.offline_weight,
                is_weights=mb.is_weights,
                bias=b,
                config=loss_cfg,
                global_normalizer=max(normalizer, 1.0),
                sequence_ids=mb.sequence_ids,
            )

        if not grad:
            with torch.no_grad():
                out = policy.call(fn)
        else:
            with parallel.gradient_sync(policy.wrapped, i == len(mbs) - 1):
                out = policy.call(fn)
                # the wrappers average gradients; the global normaliser wants a sum
                loss = out.loss * parallel.world_size()
                (policy.scaler.scale(loss) if policy.scaler else loss).backward()
        if policy.trimmer is not None:
            policy.trimmer()
        if mb.old_logprobs is None:
            mb.old_logprobs = out.logprobs
        if mb.entropy is None:
            mb.entropy = out.entropy
        n_on = (mb.loss_mask & ~mb.offline_mask).sum().double()
        n_off = mb.offline_mask.sum().double()
        add("loss", out.loss.detach().double())
        for k, v in out.metrics.items():
            if k in SUM_KEYS:
                add(k, torch.as_tensor(v).double())
            else:
                wgt = n_off if k in OFFLINE_MEANS else n_on
                add(f"{k}@sum", torch.as_tensor(v).double() * wgt)
                add(f"{k}@weight", wgt)
    if between is not None:
        between()
    params = policy.parameters()
    if policy.scaler:
        policy.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    out = {k: float(v) for k, v in stats.items()}
    out["grad_norm"] = float(norm)
    # the norm is of the reduced gradients, the same on every rank: all skip or none (no extra collective); a
    # non-finite loss on any rank makes the reduced gradients, and so the norm, non-finite
    bad = not math.isfinite(out["grad_norm"])
    if policy.scaler:  # float16: the scaler skips non-finite steps itself (overflow lowers the scale)
        policy.scaler.step(opt)
        policy.scaler.update()
    elif (
        bad
    ):  # a non-finite loss or gradient: no update (red/loop.py counts these and stops after N in a row)
        policy.skipped_updates += 1
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)  # no gradient memory through the rollouts
    return out


def policy_update(
    policy: Policy,
    batch: RolloutBatch,
    loss_cfg,
    budget: int,
    opt,
    grad_clip: float,
    normalizer: float,
    count: int | None = None,
    use_old: bool = True,
) -> dict:
    """`update` over the batch's own plan (its old_logprobs / is_weights [B, R], if any, placed in the layout)."""
    return update(policy, _plan(policy, batch, budget, count), loss_cfg, opt, grad_clip, normalizer, use_old)


def finish_metrics(sums: dict) -> dict:
    """Token-weighted means from reduced `k@sum` / `k@weight` pairs; other keys unchanged."""
    out = {k: v for k, v in sums.items() if "@" not in k}
    for k in [k for k in sums if k.endswith("@sum")]:
        name, wgt = k[:-4], sums[k[:-4] + "@weight"]
        out[name] = sums[k] / wgt if wgt > 0 else float("nan")
    return out


def make_optimizer(model, lr, betas, weight_decay, total, warmup, min_ratio):
    """AdamW over the float32 parameters + transformers' cosine schedule with warm-up and a floor (min_ratio·lr).
    The warm-up ramp is taken one step ahead, (step + 1) / warmup, so the first step already learns (the
    trainer's schedule before it used transformers' formula; values unchanged)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    # on CPU the multi-tensor (foreach) step builds a temporary of every parameter at once (+~300 MiB peak at
    # SmolLM2-135M, measured) for no speed-up; the per-parameter step computes the same update
    cpu = all(p.device.type == "cpu" for p in params)
    opt = torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=False if cpu else None
    )
    f = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio).lr_lambdas[0]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: f(step + 1) if step < warmup else f(step))
