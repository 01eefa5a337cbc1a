"""The embedded task family keeps the properties its design (experiments/embedded/DESIGN.md) relies on."""

import re

from red import synthetic
from red.rewards import extract_boxed


def _numbers(problem):
    return [int(x) for x in problem.split(":", 1)[1].split()]


def test_traces_are_correct_and_the_split_is_disjoint():
    train = synthetic.generate("chains", 400, seed=0)
    held = synthetic.generate("chains", 200, seed=0, split="heldout")
    assert {e["source"] for e in held} == {"synthetic/largest", "synthetic/smallest"}
    for e in train + held:
        nums = _numbers(e["problem"])
        want = max(nums) if "largest" in e["problem"] else min(nums)
        assert e["answer"] == str(want) == extract_boxed(e["traces"][0])
        assert 5 <= len(nums) <= 8
    assert not {tuple(_numbers(e["problem"])) for e in train} & {tuple(_numbers(e["problem"])) for e in held}
    warm = synthetic.generate("chains_warmup", 200, seed=0)
    assert all(
        "largest" in e["problem"] and "Wait" not in e["traces"][0] for e in warm
    )  # no extension, concise


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
