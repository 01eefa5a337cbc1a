"""The embedded task family keeps the properties its design (experiments/embedded/DESIGN.md) relies on."""

import re

from red import synthetic
from red.rewards import extract_boxed


def _numbers(problem):
    return [int(x) for x in problem.split(":", 1)[1].split()]


def test_traces_are_correct_and_the_three_splits_are_disjoint():
    train = synthetic.generate("chains", 400, seed=0)
    val = synthetic.generate("chains", 200, seed=0, split="validation")
    held = synthetic.generate("chains", 200, seed=0, split="heldout")
    assert (
        {e["source"] for e in held}
        == {e["source"] for e in val}
        == {"synthetic/largest", "synthetic/smallest"}
    )
    for e in train + val + held:
        nums = _numbers(e["problem"])
        want = max(nums) if "largest" in e["problem"] else min(nums)
        assert e["answer"] == str(want) == extract_boxed(e["traces"][0])  # the teacher is always right
        assert 5 <= len(nums) <= 8
    sets = [{tuple(_numbers(e["problem"])) for e in part} for part in (train, val, held)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]


def test_warmup_holds_the_base_models_habits_by_length():
    """The warm-up (the base model's pre-training) is concise and mixes careful traces with habits: for
    "largest" the careful share falls with the list length (0.8 at 5 numbers .. 0.2 at 8: the recall part the
    base half-knows), for "smallest" it is 6% (the rest answers the largest: the extension it rarely finds)."""
    warm = synthetic.generate("chains_warmup", 8000, seed=0)
    assert all("Wait" not in e["traces"][0] for e in warm)
    share = {}
    for e in warm:
        kind = "largest" if "largest" in e["problem"] else "smallest"
        careful = e["traces"][0].startswith(f"Running {kind}:")
        share.setdefault((kind, len(_numbers(e["problem"]))), []).append(careful)
    for (kind, n), xs in share.items():
        assert abs(sum(xs) / len(xs) - synthetic.WARMUP_CAREFUL[kind][n]) < 0.06, (kind, n)
    smallest = sum(len(v) for (k, _), v in share.items() if k == "smallest") / len(warm)
    assert abs(smallest - 0.25) < 0.03
    habit = [e for e in warm if e["traces"][0].startswith("Guess:")]
    assert habit and all(extract_boxed(e["traces"][0]) == str(_numbers(e["problem"])[-1]) for e in habit)


def test_verbose_teacher_fits_the_budget_and_one_more_check_mostly_does_not():
    tok = synthetic.build_tokenizer()

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    verbose = synthetic.generate("chains", 300, seed=0)
    concise = synthetic.generate("chains_concise", 300, seed=0)
    checks = [len(re.findall(r"Wait|Hmm", e["traces"][0])) for e in verbose]
    assert set(checks) == {1, 2}
    lv, lc = [n_tokens(e["traces"][0]) for e in verbose], [n_tokens(e["traces"][0]) for e in concise]
    assert max(lv) <= 48 < max(lv) + 9 and max(lc) < min(lv)  # a check costs 8-9 tokens


def test_word_problems_are_worked_and_correct():
    rows = synthetic.generate("wordproblems", 200, seed=0)
    for e in rows:
        last = re.findall(r"= (\d+)", e["traces"][0])[-1]
        assert e["answer"] == last == extract_boxed(e["traces"][0])
    held = synthetic.generate("wordproblems", 50, seed=0, split="heldout")
    assert not {e["problem"] for e in rows} & {e["problem"] for e in held}
