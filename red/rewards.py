"""Answer verification: the final \\boxed{} answer (after </think> when present) against the gold answer.

Statuses: correct, wrong, no_answer (no \\boxed{} in the response), timeout (the verifier hung or timed out),
gold_unparseable (math-verify cannot parse the gold answer; counted, reward 0).

Exact matches and plain numbers are decided in-process (they are unambiguous); everything else goes to
math-verify in a process pool, so SymPy hangs cannot stall or crash the trainer and math-verify's SIGALRM
timeouts run in each worker's main thread. Each worker parses a gold answer once and caches it.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from fractions import Fraction

STATUSES = ("correct", "wrong", "no_answer", "timeout", "gold_unparseable")
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
            last = text[m.end():i - 1]
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
    import math_verify  # noqa: F401  (import once per worker)


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
class Verifier:
    """Grades responses. `grade(golds, responses) -> list[status]`. The process pool starts on first need."""

    task = staticmethod(_verify_in_worker)   # (gold, pred, timeout_s) -> status, run in a worker process

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, outer_timeout_s: float | None = None):
        """timeout_s: math-verify's own limit in the worker; outer_timeout_s: how long the trainer waits for a
        worker (default 3·timeout_s + 30) before killing the pool and reporting 'timeout'."""
        self.workers = workers
        self.timeout_s = timeout_s
        self.outer_timeout_s = outer_timeout_s if outer_timeout_s is not None else 3 * timeout_s + 30
        self._pool: cf.ProcessPoolExecutor | None = None
        self._cache: dict[tuple[str, str], str] = {}

    def _get_pool(self):
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                initializer=_worker_init)
        return self._pool

    def _reset_pool(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
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
            results = self._run_pool(list(todo))
            for key, status in zip(todo, results):
                if status != "timeout":
                    self._cache[key] = status
                for i in todo[key]:
                    out[i] = status
        return out  # type: ignore[return-value]

    def _run_pool(self, pairs):
        """Statuses for (gold, pred) pairs. The pair whose worker hangs past outer_timeout_s (or dies) is
        reported as 'timeout', the pool is replaced, and the pairs that were queued behind it run again."""
        results: list[str | None] = [None] * len(pairs)
        t = max(1, int(self.timeout_s))
        pending = list(range(len(pairs)))
        while pending:
            pool = self._get_pool()
            futures = [(i, pool.submit(self.task, *pairs[i], t)) for i in pending]
            culprit = None
            for i, f in futures:
                try:
                    results[i] = f.result(timeout=self.outer_timeout_s)
                except (cf.TimeoutError, cf.process.BrokenProcessPool):
                    culprit = i
                    break
            if culprit is None:
                break
            results[culprit] = "timeout"
            self._reset_pool()
            pending = [i for i in pending if results[i] is None]
        return results

    def grade(self, golds: list[str], responses: list[str]) -> list[str]:
        return self.grade_answers(golds, [extract_boxed(r) for r in responses])


def count_statuses(statuses) -> dict:
    return {s: sum(1 for x in statuses if x == s) for s in STATUSES}
