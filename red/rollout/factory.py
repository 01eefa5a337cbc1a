"""make_engine(cfg, model, tokenizer): the rollout engine named by `rollout.engine` (hf | vllm | auto)."""

from __future__ import annotations

import logging

log = logging.getLogger("red.rollout")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def make_engine(cfg, model, tokenizer, stop_token_ids=None):
    """Build the engine for the trainer's live `model`.

    'hf': HFEngine on the trainer's module (no weight copies). 'vllm': red.rollout.vllm_engine.VLLMEngine,
    imported lazily. 'auto': vLLM when importable and a CUDA device is in use, else HF.
    """
    kind = cfg.rollout.engine
    if kind == "auto":
        import torch

        on_cuda = next(model.parameters()).device.type == "cuda" and torch.cuda.is_available()
        kind = "vllm" if on_cuda and vllm_available() else "hf"
        log.info("rollout.engine=auto -> %s", kind)
    if kind == "hf":
        from .hf_engine import HFEngine

        return HFEngine(model, tokenizer, stop_token_ids=stop_token_ids, batch_size=cfg.rollout.batch_size)
    if kind == "vllm":
        # vLLM branch: red.rollout.vllm_engine.engine_from_config (starts from the live model, syncs its weights)
        from .vllm_engine import engine_from_config

        return engine_from_config(cfg, model, tokenizer, stop_token_ids=stop_token_ids)
    raise ValueError(f"config key 'rollout.engine': unknown engine {kind!r}")
