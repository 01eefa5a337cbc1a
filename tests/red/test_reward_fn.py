"""reward.fn=package.module:callable: a user reward in the hang-isolated worker pool (a reward that raises scores
0, one that hangs is killed after reward.timeout_s), its named parts in the batch and in the step metrics, and a
red.train run with it."""

import json
from types import SimpleNamespace

import pytest
import torch

from red.config import ConfigError
from red.records import STATUSES, PromptItem, RolloutBatch
from red.rewards import Verifier, score
from red.rollout.base import Rollout

RCFG = SimpleNamespace(format_reward=0.5, overlong_penalty=False, overlong_buffer=2)


class _Tok:
    """ids -> words: 1 '42', 2 'boom', 3 'hang', else 'x'."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join({1: "42", 2: "boom", 3: "hang"}.get(t, "x") for t in r) for r in rows]


def _batch(responses, answer="42", fields=None):
    item = PromptItem([9], answer, [], "t", 1, 0, problem="What is 6*7?", fields=fields or {})
    ros = [Rollout([9], r, None, "stop") for r in responses]
    return RolloutBatch.from_rollouts([item], [ros], 0)


def test_parts_sum_to_the_reward_and_reach_the_step_metrics():
    v = Verifier(1, timeout_s=20, fn="tests.red.reward_fns:parts")
    try:
        s = score(_batch([[1], [5, 5]], fields={"bonus": 2}), _Tok(), v, RCFG, 8)
        # "42": 1 - 0.02 + 2 = 2.98 ; "x x": 0 - 0.03 + 2 = 1.97 (format reward does not apply)
        assert torch.allclose(s.reward, torch.tensor([2.98, 1.97]))
        assert [STATUSES[i] for i in s.status.tolist()] == ["correct", "correct"]
        parts = v.take_parts()
        assert parts == pytest.approx(
            {
                "reward_part/brevity": -0.05,
                "reward_part/correct": 1.0,
                "reward_part/prompt_seen": 0.0,
                "reward_part/row_bonus": 4.0,
                "reward_part_n": 2,
            }
        )
        assert v.take_parts() == {}  # taken once
    finally:
        v.close()


def test_a_raising_reward_scores_zero_and_a_hanging_one_is_killed(caplog):
    v = Verifier(1, timeout_s=3, fn="tests.red.reward_fns:raises")
    try:
        s = score(_batch([[1], [2]]), _Tok(), v, RCFG, 8)
        assert s.reward.tolist() == [1.0, 0.0]
        assert [STATUSES[i] for i in s.status.tolist()] == ["correct", "wrong"]
    finally:
        v.close()
    assert "reward.fn errors (scored 0)" in caplog.text and "ValueError: cannot grade this" in caplog.text
    v = Verifier(1, timeout_s=3, fn="tests.red.reward_fns:hangs")
    try:
        s = score(_batch([[3], [1]]), _Tok(), v, RCFG, 8)
        assert s.reward.tolist() == [0.0, 1.0]  # the worker was replaced: the next call still scores
        assert [STATUSES[i] for i in s.status.tolist()] == ["timeout", "correct"]
    finally:
        v.close()
    assert "reward.fn calls killed after reward.timeout_s" in caplog.text


def test_a_result_that_is_not_a_number_is_an_error_scored_zero(caplog):
    v = Verifier(1, timeout_s=20, fn="tests.red.reward_fns:not_a_number")
    try:
        assert score(_batch([[1]]), _Tok(), v, RCFG, 8).reward.tolist() == [0.0]
    finally:
        v.close()
    assert "must return a number or a non-empty dict of numbers" in caplog.text


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("tests.red.reward_fns", "expected package.module:callable"),
        ("tests.red.nope:f", "cannot load 'tests.red.nope:f' \\(ModuleNotFoundError"),
        ("tests.red.reward_fns:missing", "cannot load .*AttributeError"),
    ],
)
def test_a_bad_spec_is_a_config_error_naming_the_key(spec, msg):
    with pytest.raises(ConfigError, match=f"config key 'reward.fn': {msg}"):
        Verifier(1, fn=spec)


@pytest.mark.slow
def test_train_with_a_user_reward_logs_its_parts(tmp_path):
    from red.train import main
    from tests.e2e.test_train_e2e import TINY

    out = tmp_path / "run"
    assert main([f"output_dir={out}", "train.steps=1", "reward.fn=tests.red.reward_fns:parts", *TINY]) == 0
    (row,) = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert {"reward/correct", "reward/brevity", "reward/row_bonus", "reward/prompt_seen"} <= row.keys()
    assert row["reward/prompt_seen"] == 0.0 and row["reward/brevity"] < 0
    assert main([f"output_dir={tmp_path}/bad", "reward.fn=tests.red.reward_fns:missing", *TINY]) == 2
