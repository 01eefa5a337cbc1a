"""The benches' reward: a learning signal that does not depend on the model being any good.

The trainer benches run random or untrained models, which score 0 on the tasks' math reward: every group would
have all rewards equal, every advantage 0, and nothing to learn — a step that TRL still backpropagates in full and
that red.train runs without a backward (red_kernels.policy_loss.gradient_free). That measures no real step. The
benches give every trainer this reward instead: the parity of the CRC-32 of the completion's text, 0 or 1 with
about even odds, so nearly every group has both and nearly every sequence a non-zero advantage, as in a run that
learns.
"""

from __future__ import annotations

import zlib


def parity(text: str) -> float:
    """1.0 or 0.0: the lowest bit of the CRC-32 of `text` (UTF-8)."""
    return float(zlib.crc32(text.encode("utf-8")) & 1)


def red_reward(prompt: str, response: str, answer: str, row: dict) -> float:
    """red.train's user-reward signature (`reward.fn=bench.rewards:red_reward`)."""
    return parity(response)


def trl_reward(completions, **kwargs) -> list[float]:
    """TRL's reward-function signature (conversational completions: [[{"role", "content"}]])."""
    return [parity(c[0]["content"] if isinstance(c, list) else c) for c in completions]
