"""Which attention implementation the model uses, and whether micro-batches are packed with it.

`model.attn_implementation: auto` picks, by device:
* CPU: `sdpa`. Layout "shared" by default (`train.share_prompts`, red/packing.py): rows of chunks, each a
  group's prompt once and members after it, with an explicit [b, 1, L, L] mask that masking_utils passes through
  as a custom 4-D mask (sdpa and eager, any device). Without prompt sharing, layout "rows": packed rows work through transformers'
  masks: with attention_mask=None, use_cache=False and no cache, masking_utils._preprocess_mask_arguments calls
  find_packed_sequence_indices(position_ids) (a new sequence wherever the position does not grow by 1) and
  create_causal_mask ANDs a block-diagonal mask into the causal one (also for `eager`).
* CUDA: `flash_attention_2` when flash-attn is installed (extra `[gpu]`; transformers' padding-free path turns
  packed position_ids of a b = 1 row into cu_seqlens for flash_attn_varlen_func), else `torch_varlen` — this
  module's registration of torch.nn.attention.varlen.varlen_attn as a transformers attention function —, else
  `sdpa` with padded micro-batches and a warning. Layout "flat".

`torch_varlen` is a complete implementation: packed training forwards (no 2-D mask, as many keys as queries)
run varlen_attn with cu_seqlens from position_ids; everything else (generate with a KV cache, padded
batches) goes to transformers' sdpa_attention_forward with the usual sdpa mask.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings

import torch

log = logging.getLogger("red.attention")
VARLEN = "torch_varlen"
FLAT = ("flash_attention_2", "flash_attention_3", VARLEN)  # padding-free through cu_seqlens: one row
MASKED = ("sdpa", "eager")  # block-diagonal masks from position_ids


def _varlen_fn():
    """torch.nn.attention.varlen.varlen_attn, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def has_flash_attn() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return importlib.util.find_spec("flash_attn") is not None and is_flash_attn_2_available()


def resolve(name: str, device, dtype: str = "bfloat16") -> str:
    """The attention implementation for `model.attn_implementation` = name on `device` with compute `dtype`
    ("auto": see above; FlashAttention kernels take only float16/bfloat16, so float32 on CUDA gets sdpa)."""
    if name != "auto":
        if name == VARLEN:
            register()
        return name
    if torch.device(device).type != "cuda" or dtype == "float32":
        return "sdpa"
    if has_flash_attn():
        return "flash_attention_2"
    if _varlen_fn() is not None:
        register()
        return VARLEN
    return "sdpa"


def packing_layout(attn: str, device, enabled: bool = True, share_prompts: bool = False) -> str:
    """Micro-batch layout for `train.packing` = enabled and `train.share_prompts` with attention `attn` on
    `device`: off | rows | flat | shared. Prompt sharing needs an explicit attention mask (a member sees its
    prompt, not the other members), which sdpa and eager take on any device; the varlen kernels (cu_seqlens)
    cannot express it, so FlashAttention keeps the one-row "flat" layout."""
    if not enabled:
        return "off"
    if attn in FLAT:
        return "flat"
    if attn in MASKED and share_prompts:
        return "shared"
    if attn in MASKED and torch.device(device).type == "cpu":
        return "rows"
    warnings.warn(
        f"train.packing: attention {attn!r} on {torch.device(device).type} has no packed-sequence "
        "path here (on CUDA: model.dtype bfloat16/float16 and model.attn_implementation auto, with the "
        "[gpu] extra for flash_attention_2 or a torch with torch.nn.attention.varlen); using padded "
        "micro-batches",
        stacklevel=2,
    )
    return "off"


def shared_row_tokens(config) -> int:
    """The widest row of layout "shared" for a model `config`: masked attention over a row of W tokens costs
    about 4·W·H FLOPs per token and layer (QKᵀ and AV over every key of the row), the layer's projections about
    8·H² + 6·H·I (Q, K, V, O and the gated MLP); W = H + 0.75·I keeps attention at most half of those. (The
    default tiny model: 416; SmolLM2-135M: 1,728.) Measured on the default tiny model (bench.smollm2_step's tiny
    GRPO shape, 2026-12-05): one unbounded ~800-token row took the update 1.2x the time of packed rows
    (0.243 vs 0.199 s), rows bounded at 416 tokens 0.65x (0.134 vs 0.205 s)."""
    h = int(config.hidden_size)
    i = int(getattr(config, "intermediate_size", None) or 4 * h)
    return h + (3 * i) // 4


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    *,
    varlen=None,
    position_ids=None,
    **kwargs,
):
    """transformers attention function (AttentionInterface): query [B, Hq, T, D], key/value [B, Hkv, Tk, D] ->
    ([B, T, Hq, D], None). A packed forward (attention_mask None, Tk == T) runs varlen_attn on the flattened
    tokens with one causal block per sequence (cu_seqlens from position_ids, restarting at 0); anything else
    runs transformers' sdpa_attention_forward. `varlen` replaces torch's varlen_attn (tests on CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    b, hq, t, d = query.shape
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if attention_mask is not None or key.shape[2] != t or position_ids is None or not causal:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
    if dropout:
        raise ValueError(f"attention {VARLEN!r}: attention dropout is not supported (got {dropout})")
    varlen = varlen or _varlen_fn()
    (cu, _), (mx, _) = prepare_fa_kwargs_from_position_ids(position_ids.expand(b, t))
    q, k, v = (x.transpose(1, 2).reshape(b * x.shape[2], x.shape[1], d) for x in (query, key, value))
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):  # RoPE promoted q, k to float32
        q, k, v = (x.to(torch.get_autocast_dtype(q.device.type)) for x in (q, k, v))
    params = inspect.signature(varlen).parameters
    kw = {"scale": scaling} if "scale" in params else {}
    if k.shape[1] != hq:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(hq // x.shape[1], dim=1) for x in (k, v))
    if "window_size" in params:
        kw["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    else:
        if sliding_window:
            raise ValueError(f"attention {VARLEN!r}: this torch's varlen_attn has no sliding window")
        kw["is_causal"] = True
    mx = int(mx)
    out = varlen(q, k, v, cu, cu, mx, mx, **kw)
    return out.reshape(b, t, hq, d), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """Mask for torch_varlen: none for packed forwards (the varlen call has the blocks), else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `torch_varlen` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
