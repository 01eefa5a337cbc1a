"""Answer extraction, verification statuses (math-verify in a pebble process pool, hang isolation) and the reward
formula on a RolloutBatch."""

import time

import pytest

from red.rewards import Verifier, count_statuses, extract_boxed, quick_verdict


@pytest.mark.parametrize(
    "text, expect",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x^{2}+\\sqrt{3}}", "x^{2}+\\sqrt{3}"),
        ("<think>\\boxed{3}</think> final \\fbox{4}", "4"),
        ("<think>\\boxed{3}</think> no box after think", None),
        ("no answer", None),
        ("unbalanced \\boxed{12", None),
    ],
)
def test_extract_boxed(text, expect):
    assert extract_boxed(text) == expect


def test_quick_verdict_only_decides_unambiguous_cases():
    assert quick_verdict("7", " 7 ") == "correct"
    assert quick_verdict("7", "7.0") == "correct"
    assert quick_verdict("1,000", "1000") == "correct"
    assert quick_verdict("7", "8") == "wrong"
    assert quick_verdict("\\frac{1}{2}", "0.5") is None  # needs math-verify


def test_statuses_through_math_verify():
    v = Verifier(workers=1, timeout_s=5)
    try:
        golds = ["\\frac{1}{2}", "x+1", "\\frac{1}{2}", "3", "\\{1,2\\}", "5"]
        resp = [
            "\\boxed{0.5}",
            "\\boxed{1+x}",
            "\\boxed{1/3}",
            "I think 3",
            "\\boxed{\\{2,1\\}}",
            "\\boxed{5}",
        ]
        st = v.grade(golds, resp)
        assert st == ["correct", "correct", "wrong", "no_answer", "correct", "correct"]
        assert count_statuses(st) == {
            "correct": 4,
            "wrong": 1,
            "no_answer": 1,
            "timeout": 0,
            "gold_unparseable": 0,
        }
        assert v.grade(["\\boxed{}"], ["\\boxed{3}"]) == ["gold_unparseable"]
    finally:
        v.close()


def hang_or_echo(gold, pred, timeout_s):
    """Stand-in for the math-verify task: hangs like a stuck SymPy call on pred == 'hang'."""
    if pred == "hang":
        time.sleep(60)
    return "correct" if gold == pred.upper() else "wrong"


class HangingVerifier(Verifier):
    task = staticmethod(hang_or_echo)


def test_a_hanging_verification_is_isolated_and_reported_as_timeout():
    v = HangingVerifier(workers=1, timeout_s=1, outer_timeout_s=1.5)
    try:
        # "timeout" (not the 60 s sleep's eventual answer) proves the hang was cut off in its worker
        st = v.grade_answers(["A", "B", "C"], ["a", "hang", "b"])
        assert st == ["correct", "timeout", "wrong"]
        assert v.grade_answers(["D"], ["d"]) == ["correct"]  # the pool was replaced and works
    finally:
        v.close()


class _Tok:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r)) for r in rows]


class _Grader:
    def grade_answers(self, golds, preds):
        return [
            "correct" if p == g else ("no_answer" if p is None else "wrong") for g, p in zip(golds, preds)
        ]


def test_score_is_accuracy_plus_format_reward_plus_overlong_penalty(monkeypatch):
    from types import SimpleNamespace

    import torch

    from red import rewards
    from red.records import PromptItem, RolloutBatch
    from red.rollout.base import Rollout

    # responses decode to "boxed:<last id>" for ids ending in 7/8, else no answer
    monkeypatch.setattr(
        rewards, "extract_boxed", lambda t: t.split()[-1] if t.split()[-1] in ("7", "8") else None
    )
    item = PromptItem([1, 2], "7", [[5, 7]], "t", 1, 0)
    ros = [
        Rollout([1, 2], [3, 7], None, "stop"),
        Rollout([1, 2], [3, 3, 3, 8], None, "length"),
        Rollout([1, 2], [4], None, "stop"),
    ]
    b = RolloutBatch.from_rollouts([item], [ros], 1)
    cfg = SimpleNamespace(format_reward=0.1, overlong_penalty=True, overlong_buffer=2)
    s = rewards.score(b, _Tok(), _Grader(), cfg, max_new_tokens=4)
    assert [STATUS for STATUS in s.status.tolist()] == [
        0,
        1,
        2,
        0,
    ]  # correct, wrong, no_answer, teacher correct
    # L_max - B = 2: lengths 2, 4, 1, 2 -> penalties 0, -1, 0, 0
    assert torch.allclose(s.reward, torch.tensor([1.1, 0.1 - 1.0, 0.0, 1.1]))
    assert s.texts[0] == "3 7" and b.reward is None  # a new record; the input is unchanged
