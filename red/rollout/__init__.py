"""Rollout engines: generate completions for prompts (HF `generate` or vLLM) behind one interface."""

from .base import Rollout, RolloutEngine, SamplingConfig

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig"]
