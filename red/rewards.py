"""Rewards: the whole formula R = Acc (+ format reward) (+ soft overlong penalty), and answer verification of the
final \\boxed{} answer (after </think> when present) against the gold answer.

Statuses: correct, wrong, no_answer (no \\boxed{} in the response), timeout (the verifier hung or timed out),
gold_unparseable (math-verify cannot parse the gold answer; counted, reward 0).

Exact matches and plain numbers are decided in-process (they are unambiguous); everything else goes to
math-verify in a pebble process pool, so SymPy hangs cannot stall or crash the trainer (pebble kills a worker
that runs past its timeout and starts a new one) and math-verify's SIGALRM timeouts run in each worker's main
thread. Each worker parses a gold answer once and caches it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import re
import time
from fractions import Fraction

import pebble
import torch

from .records import STATUSES, RolloutBatch

log = logging.getLogger("red.rewards")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces) in the text after the last </think>; None if none."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last = text[m.end() : i - 1]
    return None if last is None else last.strip()


def _as_number(s: str):
    t = s.replace(",", "").replace("$", "").strip()
    if _NUMBER.match(t):
        return Fraction(t)
    return None


def quick_verdict(gold: str, pred: str) -> str | None:
    """'correct' / 'wrong' when decidable without math-verify (identical strings, two plain numbers), else
    None."""
    g, p = gold.strip(), pred.strip()
    if g == p:
        return "correct"
    gn, pn = _as_number(g), _as_number(p)
    if gn is not None and pn is not None:
        return "correct" if gn == pn else "wrong"
    return None


# ------------------------------------------------------------------------------------------- worker side
_GOLD_CACHE: dict = {}


def _worker_init():
    import signal

    import math_verify  # noqa: F401  (import once per worker)

    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole process group: the trainer decides


def _verify_in_worker(gold: str, pred: str, timeout_s: int) -> str:
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        if gold not in _GOLD_CACHE:
            g = parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$", parsing_timeout=timeout_s)
            if not g:
                g = parse(gold, parsing_timeout=timeout_s)
            _GOLD_CACHE[gold] = g
        g = _GOLD_CACHE[gold]
        if not g:
            return "gold_unparseable"
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout_s)
        if not p:
            return "wrong"
        return "correct" if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True) else "wrong"
    except TimeoutException:
        return "timeout"
    except Exception:  # a malformed expression is a wrong answer, not a crash
        return "wrong"


# ------------------------------------------------------------------------------------------- main side
class RateLimitedLog:
    """Counts events by kind and logs a warning at most once per `every_s` seconds (the first at once), with the
    counts since the previous warning, the totals and one example."""

    def __init__(self, logger, what: str, every_s: float = 60.0, clock=time.monotonic):
        self.logger, self.what, self.every_s, self.clock = logger, what, every_s, clock
        self.total: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.example = ""
        self.last: float | None = None

    def add(self, kind: str, example: str = "") -> None:
        self.total[kind] = self.total.get(kind, 0) + 1
        self.pending[kind] = self.pending.get(kind, 0) + 1
        self.example = self.example or example
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = self.clock()
        if not self.pending or not (force or self.last is None or now - self.last >= self.every_s):
            return
        since = ", ".join(f"{n} {k}" for k, n in self.pending.items())
        total = ", ".join(f"{n} {k}" for k, n in self.total.items())
        self.logger.warning(
            "%s: %s (total %s)%s", self.what, since, total, f"; e.g. {self.example}" * bool(self.example)
        )
        self.pending, self.example, self.last = {}, "", now


class Verifier:
    """Grades responses. `grade(golds, responses) -> list[status]`. The process pool starts on first need."""

    task = staticmethod(_verify_in_worker)  # (gold, pred, timeout_s) -> status, run in a worker process

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, outer_timeout_s: float | None = None):
        """timeout_s: math-verify's own limit in the worker; outer_timeout_s: how long a task may run in its
        worker (default 3·timeout_s + 30) before pebble kills that worker and the pair counts as 'timeout'."""
        self.workers = workers
        self.timeout_s = timeout_s
        self.outer_timeout_s = outer_timeout_s if outer_timeout_s is not None else 3 * timeout_s + 30
        self._pool: pebble.ProcessPool | None = None
        self._cache: dict[tuple[str, str], str] = {}
        self.events = RateLimitedLog(
            log, f"verifier (reward.timeout_s={timeout_s}, worker limit {self.outer_timeout_s:.0f} s)"
        )

    def close(self):
        self.events.flush(force=True)  # what the rate limit held back
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def grade_answers(self, golds: list[str], preds: list[str | None]) -> list[str]:
        """Statuses for extracted answers (None = no \\boxed{} found)."""
        out: list[str | None] = [None] * len(golds)
        todo = {}
        for i, (g, p) in enumerate(zip(golds, preds)):
            if p is None:
                out[i] = "no_answer"
            elif (g, p) in self._cache:
                out[i] = self._cache[(g, p)]
            elif (v := quick_verdict(g, p)) is not None:
                out[i] = v
            else:
                todo.setdefault((g, p), []).append(i)
        if todo:
            if self._pool is None:
                self._pool = pebble.ProcessPool(
                    self.workers, initializer=_worker_init, context=mp.get_context("spawn")
                )
            t = max(1, int(self.timeout_s))
            futures = [
                self._pool.schedule(self.task, args=(*key, t), timeout=self.outer_timeout_s) for key in todo
            ]
            for key, fut in zip(todo, futures):
                example = f"gold {key[0][:40]!r} vs answer {key[1][:40]!r}"
                try:
                    status = fut.result()
                    self._cache[key] = status
                    if status == "timeout":
                        self.events.add("math-verify timeouts", example)
                except cf.TimeoutError:  # pebble killed the worker and starts a new one
                    status = "timeout"
                    self.events.add("worker restarts after running past the limit", example)
                except pebble.ProcessExpired as e:  # the worker died (e.g. out of memory); pebble restarts it
                    status = "timeout"
                    self.events.add(f"worker restarts after it died (exit {e.exitcode})", example)
                for i in todo[key]:
                    out[i] = status
        return out  # type: ignore[return-value]

    def grade(self, golds: list[str], responses: list[str]) -> list[str]:
        return self.grade_answers(golds, [extract_boxed(r) for r in responses])


def count_statuses(statuses) -> dict:
    return {s: sum(1 for x in statuses if x == s) for s in STATUSES}


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """Soft overlong penalty (DAPO): (L_max - B - L) / B for L > L_max - B, else 0; floored at -1."""
    excess = lengths.double() - (max_len - buffer)
    return torch.where(excess > 0, (-excess / buffer).clamp_min(-1.0), torch.zeros_like(excess)).float()


def score(batch: RolloutBatch, tokenizer, verifier: Verifier, rcfg, max_new_tokens: int) -> RolloutBatch:
    """texts, status and reward of every row: R = Acc (+ rcfg.format_reward if a \\boxed{} answer is present)
    (+ the soft overlong penalty when rcfg.overlong_penalty)."""
    rows = [batch.response[i, :n].tolist() for i, n in enumerate(batch.response_len.tolist())]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True) if rows else []
    preds = [extract_boxed(t) for t in texts]
    golds = [it.answer for it in batch.items for _ in range(batch.n)]
    status = torch.tensor([STATUSES.index(s) for s in verifier.grade_answers(golds, preds)], dtype=torch.long)
    has_answer = torch.tensor([p is not None for p in preds], dtype=torch.bool)
    reward = (status == 0).float() + rcfg.format_reward * has_answer.float()
    if rcfg.overlong_penalty:
        reward = reward + overlong_penalty(batch.response_len, max_new_tokens, rcfg.overlong_buffer)
    return batch.replace(texts=tuple(texts), status=status, reward=reward)
