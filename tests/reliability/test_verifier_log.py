"""Verifier timeouts and worker restarts are logged (rate-limited) as well as counted (issue 24, case 11)."""

import logging
import os
import time

from red.rewards import RateLimitedLog, Verifier


def test_rate_limited_log_says_the_first_at_once_then_at_most_once_per_interval(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t"), "verifier", every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        rl.add("timeouts", "gold '1' vs answer 'x'")
        for t in (10, 20, 30):
            now[0] = t
            rl.add("timeouts")
        assert len(caplog.records) == 1
        now[0] = 61
        rl.add("restarts")
        now[0] = 70
        rl.add("timeouts")
        rl.flush(force=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "verifier: 1 timeouts (total 1 timeouts); e.g. gold '1' vs answer 'x'",
        "verifier: 3 timeouts, 1 restarts (total 4 timeouts, 1 restarts)",
        "verifier: 1 timeouts (total 5 timeouts, 1 restarts)",
    ]


def misbehave(gold, pred, timeout_s):
    """Stand-in for the math-verify task: hangs, dies, or reports math-verify's own timeout."""
    if pred == "hang":
        time.sleep(60)
    if pred == "die":
        os._exit(3)
    if pred == "slow":
        return "timeout"
    return "correct" if gold == pred.upper() else "wrong"


class MisbehavingVerifier(Verifier):
    task = staticmethod(misbehave)


def test_verifier_timeouts_and_restarts_are_logged(caplog):
    v = MisbehavingVerifier(workers=1, timeout_s=1, outer_timeout_s=1.5)
    with caplog.at_level(logging.WARNING, logger="red.rewards"):
        try:
            st = v.grade_answers(["A", "B", "C", "D"], ["a", "hang", "slow", "die"])
        finally:
            v.close()
    assert st == ["correct", "timeout", "timeout", "timeout"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "red.rewards"]
    assert msgs[0].startswith(
        "verifier (reward.timeout_s=1, worker limit 2 s): 1 worker restarts after running"
    )
    assert "e.g. gold 'B' vs answer 'hang'" in msgs[0]
    assert len(msgs) == 2  # the rest held back by the rate limit, then said at close
    assert (
        "(total 1 worker restarts after running past the limit, 1 math-verify timeouts, "
        "1 worker restarts after it died (exit 3))" in msgs[-1]
    )
