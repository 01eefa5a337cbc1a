"""User reward functions for tests/red/test_reward_fn.py (imported by name in the reward workers)."""

import time


def exact(prompt, response, answer, row):
    """1 when the answer appears in the response."""
    return float(answer in response)


def parts(prompt, response, answer, row):
    """Named parts: correctness, a length penalty and one read from the row."""
    return {
        "correct": float(answer in response),
        "brevity": -0.01 * len(response),
        "row_bonus": float(row.get("bonus", 0)),
        "prompt_seen": 0.0 if prompt else -100.0,
    }


def raises(prompt, response, answer, row):
    if "boom" in response:
        raise ValueError("cannot grade this")
    return 1.0


def hangs(prompt, response, answer, row):
    if "hang" in response:
        time.sleep(600)
    return 1.0


def not_a_number(prompt, response, answer, row):
    return "yes"
