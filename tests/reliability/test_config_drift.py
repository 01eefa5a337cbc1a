"""Config drift on resume (issue 24, case 3): a changed config stops the run with the diff, unless
checkpoint.allow_changes names the keys; allowed changes take effect (the learning rate really changes) and are
recorded in config_history.jsonl; config.yaml (the config the run started with) is never overwritten."""

import json
import os
import shutil

import pytest
import yaml
from conftest import metric_steps, tiny_args

from red.config import ConfigError, load_config
from red.drift import diff
from red.train import main


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("drift") / "run")
    assert main(tiny_args(out, 4)) == 0
    return out


def _rows(out):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def _from_step_2(base_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    with open(os.path.join(out, "latest"), "w") as fh:
        fh.write("step_2\n")
    return out


def test_a_changed_config_stops_the_resume_with_the_diff(base_run, tmp_path, capsys):
    out = _from_step_2(base_run, tmp_path)
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    assert main(tiny_args(out, 4, "optim.lr=2e-3", "seed=5")) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.002" in err and "seed: 0 -> 5" in err and "Traceback" not in err
    assert "checkpoint.allow_changes=[optim.lr,seed]" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    assert not os.path.exists(os.path.join(out, "config_history.jsonl"))


def test_an_allowed_lr_change_takes_effect_and_is_recorded(base_run, tmp_path):
    out = _from_step_2(base_run, tmp_path)
    original = open(os.path.join(out, "config.yaml")).read()
    assert main(tiny_args(out, 4, "optim.lr=2e-3", "checkpoint.allow_changes=[optim.lr]")) == 0
    old, new = _rows(base_run), _rows(out)
    assert metric_steps(out) == [0, 1, 2, 3, 4]
    assert [new[s]["lr"] for s in (1, 2)] == [old[s]["lr"] for s in (1, 2)]
    # same cosine schedule, twice the peak: the rate after steps 3 and 4 doubles (and the step-3 update used it)
    assert [new[s]["lr"] for s in (3, 4)] == pytest.approx([2 * old[s]["lr"] for s in (3, 4)], rel=1e-12)
    assert new[3]["loss"] == old[3]["loss"] and new[4]["loss"] != old[4]["loss"]
    hist = [json.loads(ln) for ln in open(os.path.join(out, "config_history.jsonl"))]
    assert len(hist) == 1 and hist[0]["resumed_at_step"] == 2
    assert hist[0]["changes"] == {"optim.lr": {"from": 0.001, "to": 0.002}}
    assert open(os.path.join(out, "config.yaml")).read() == original
    assert yaml.safe_load(original)["optim"]["lr"] == 0.001


def test_the_same_config_resumes_without_a_history_row(base_run, tmp_path):
    out = _from_step_2(base_run, tmp_path)
    assert main(tiny_args(out, 4, "log.progress=true")) == 0  # display-only keys never count
    assert not os.path.exists(os.path.join(out, "config_history.jsonl"))
    old, new = _rows(base_run), _rows(out)
    assert [new[s]["loss"] for s in (3, 4)] == [old[s]["loss"] for s in (3, 4)]


def test_diff_names_nested_keys_and_sections_can_be_allowed():
    a, b = (
        load_config(None, []).to_dict(),
        load_config(None, ["eval.n=3", "model.tiny={hidden_size: 8}"]).to_dict(),
    )
    d = diff(a, b)
    assert set(d) == {"eval.n", "model.tiny"} and d["eval.n"] == (1, 3)
    with pytest.raises(ConfigError, match=r"'checkpoint.allow_changes': 'optim.lrr' is not a config key"):
        load_config(None, ["checkpoint.allow_changes=[optim.lrr]"])
    assert load_config(None, ["checkpoint.allow_changes=eval"]).checkpoint.allow_changes == ["eval"]
