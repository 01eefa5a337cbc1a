"""Rewards: the whole formula R = Acc (+ format reward) (+ soft overlong penalty), and answer verification of the
final \\boxed{} answer (after </think> when present) against the gold answer.

Statuses: correct, wrong, no_answer (no \\boxed{} in the response), timeout (the verifier hung or timed out),
gold_unparseable (math-verify cannot parse the gold answer; counted, reward 0).

Exact matches and plain numbers are decided in-process (they are unambiguous); everything else goes to
math-verify in a pebble process pool, so SymPy hangs cannot stall or crash the trainer (pebble kills a worker
that runs past its timeout and starts a new one) and math-verify's SIGALRM timeouts run in each worker's main
thread. Each worker parses a gold answer once and caches it.

A user reward (`reward.fn=package.module:callable`) replaces math-verify and runs in the same pool:
    fn(prompt: str, response: str, answer: str, row: dict) -> float | dict[str, float]
prompt is the problem text, response the decoded completion, answer the row's gold answer, row the data row's
columns (teacher traces left out). A float is the reward; a dict gives named parts whose sum is the reward and
each of which is logged per step as `reward/<name>` (mean over the step's scored responses). A response counts
as correct (accuracy, dynamic sampling, RED's accuracy shift) when its reward is >= 1. One that raises scores 0
(status wrong), one that runs past reward.timeout_s is killed with its worker and scores 0 (status timeout);
both are counted in rate-limited warnings. The format reward does not apply; the overlong penalty does.
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


def load_reward_fn(spec: str):
    """The callable `package.module:name` names (ConfigError naming reward.fn when it cannot be imported)."""
    import importlib

    from .errors import ConfigError

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"config key 'reward.fn': expected package.module:callable, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'reward.fn': cannot load {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"config key 'reward.fn': {spec!r} is not callable")
    return fn


def reward_parts(out) -> dict[str, float]:
    """A reward function's result as named parts: a number -> {"reward": x}; a dict -> its items as floats."""
    parts = dict(out) if isinstance(out, dict) else {"reward": out}
    bad = {k: v for k, v in parts.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad or not parts:
        raise TypeError(f"must return a number or a non-empty dict of numbers, got {out!r}")
    return {str(k): float(v) for k, v in parts.items()}


_FN_CACHE: dict = {}


def _custom_in_worker(spec: str, prompt: str, response: str, answer: str, row: dict) -> dict:
    """{"parts": {...}} or {"error": "Type: message"}: a user reward never crashes its worker."""
    try:
        fn = _FN_CACHE.get(spec) or _FN_CACHE.setdefault(spec, load_reward_fn(spec))
        return {"parts": reward_parts(fn(prompt, response, answer, row))}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


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

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 10.0,
        outer_timeout_s: float | None = None,
        fn: str | None = None,
    ):
        """timeout_s: math-verify's own limit in the worker; outer_timeout_s: how long a task may run in its
        worker (default 3·timeout_s + 30) before pebble kills that worker and the pair counts as 'timeout'.
        fn: a user reward `package.module:callable` (imported here once to fail early; see the module
        docstring), run by `grade_custom` with timeout_s as its worker limit."""
        self.fn = fn
        if fn:
            load_reward_fn(fn)
        self._part_sums: dict[str, float] = {}
        self._part_count = 0
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
            self._ensure_pool()
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

    def _ensure_pool(self) -> pebble.ProcessPool:
        if self._pool is None:
            self._pool = pebble.ProcessPool(
                self.workers, initializer=_worker_init, context=mp.get_context("spawn")
            )
        return self._pool

    def grade_custom(self, prompts, responses, answers, rows) -> list[tuple[str, float, dict]]:
        """(status, reward, parts) per response from the user reward `self.fn`, each call in a pool worker
        killed after timeout_s; parts are also summed for `take_parts`."""
        pool = self._ensure_pool()
        futures = [
            pool.schedule(_custom_in_worker, args=(self.fn, *args), timeout=self.timeout_s)
            for args in zip(prompts, responses, answers, rows)
        ]
        out = []
        for fut, response in zip(futures, responses):
            example = f"response {response[:40]!r}"
            try:
                res = fut.result()
            except cf.TimeoutError:
                self.events.add("reward.fn calls killed after reward.timeout_s", example)
                out.append(("timeout", 0.0, {}))
                continue
            except pebble.ProcessExpired as e:
                self.events.add(f"reward.fn workers died (exit {e.exitcode})", example)
                out.append(("timeout", 0.0, {}))
                continue
            if "error" in res:
                self.events.add("reward.fn errors (scored 0)", f"{res['error'][:120]} on {example}")
                out.append(("wrong", 0.0, {}))
                continue
            parts = res["parts"]
            total = sum(parts.values())
            for k, v in parts.items():
                self._part_sums[k] = self._part_sums.get(k, 0.0) + v
            out.append(("correct" if total >= 1.0 else "wrong", total, parts))
        self._part_count += len(responses)
        return out

    def take_parts(self) -> dict:
        """Sums of the user reward's parts since the last call, as `reward_part/<name>` plus `reward_part_n`
        (responses scored), for the step's metric reduction; {} without parts."""
        if not self._part_sums:
            self._part_count = 0
            return {}
        out = {f"reward_part/{k}": v for k, v in sorted(self._part_sums.items())}
        out["reward_part_n"] = self._part_count
        self._part_sums, self._part_count = {}, 0
        return out

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
    if getattr(verifier, "fn", None):  # a user reward (reward.fn)
        items = [it for it in batch.items for _ in range(batch.n)]
        graded = verifier.grade_custom(
            [it.problem for it in items], texts, [it.answer for it in items], [it.fields for it in items]
        )
        status = torch.tensor([STATUSES.index(st) for st, _, _ in graded], dtype=torch.long)
        reward = torch.tensor([r for _, r, _ in graded], dtype=torch.float32)
        if rcfg.overlong_penalty:
            reward = reward + overlong_penalty(batch.response_len, max_new_tokens, rcfg.overlong_buffer)
        return batch.replace(texts=tuple(texts), status=status, reward=reward)
    preds = [extract_boxed(t) for t in texts]
    golds = [it.answer for it in batch.items for _ in range(batch.n)]
    status = torch.tensor([STATUSES.index(s) for s in verifier.grade_answers(golds, preds)], dtype=torch.long)
    has_answer = torch.tensor([p is not None for p in preds], dtype=torch.bool)
    reward = (status == 0).float() + rcfg.format_reward * has_answer.float()
    if rcfg.overlong_penalty:
        reward = reward + overlong_penalty(batch.response_len, max_new_tokens, rcfg.overlong_buffer)
    return batch.replace(texts=tuple(texts), status=status, reward=reward)
