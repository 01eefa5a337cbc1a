"""red/run_dir.py: every JSON a run or a comparison writes is strict JSON (NaN -> null, ±inf -> strings); the one
atomic write (a crash leaves the previous file or directory as it was)."""

import json
import math
import os
from pathlib import Path

import pytest

from red.metrics import MetricsLogger
from red.run_dir import json_ready


def test_json_ready_replaces_non_finite_numbers_at_any_depth():
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": {"e": math.nan, "f": "x"}}, "g": 3}
    out = json_ready(obj)
    assert out == {"a": None, "b": [1.5, "inf", ["-inf", 2]], "c": {"d": {"e": None, "f": "x"}}, "g": 3}
    json.dumps(out, allow_nan=False)  # raises ValueError if any NaN/inf were left
    assert math.isnan(obj["a"])  # the input is not modified


def test_metrics_rows_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(path)) as logger:
        logger.log({"step": 1, "len_correct_mean": math.nan, "ratio_max": math.inf, "acc": 0.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "len_correct_mean": None, "ratio_max": "inf", "acc": 0.5}


def test_atomic_write_replaces_on_success_and_keeps_the_old_on_failure(tmp_path):
    from red.run_dir import RunDir, atomic, temporary

    d = tmp_path / "step_1"
    with atomic(str(d)) as tmp:
        os.makedirs(tmp)
        (Path(tmp) / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic(str(d)) as tmp:  # a crash half-way through a second write
            os.makedirs(tmp)
            (Path(tmp) / "a").write_text("half")
            raise RuntimeError("crash")
    assert (d / "a").read_text() == "old" and os.path.isdir(temporary(str(d)))
    with atomic(str(d)) as tmp:  # the next write starts from an empty temporary
        os.makedirs(tmp)
        (Path(tmp) / "b").write_text("new")
    assert sorted(os.listdir(d)) == ["b"] and not os.path.exists(temporary(str(d)))
    with pytest.raises(RuntimeError):
        with atomic(str(d)) as tmp:
            os.makedirs(tmp)
            raise RuntimeError("crash")
    RunDir(str(tmp_path)).clear()  # checkpoint.resume=never also removes the leftover
    assert os.listdir(tmp_path) == []


def test_model_dir_accepts_a_model_a_run_folder_and_its_latest_pointer(tmp_path):
    from red.run_dir import model_dir

    run = tmp_path / "run"
    for d in ("warmup", "step_2", "step_4"):
        (run / d).mkdir(parents=True)
        (run / d / "config.json").write_text("{}")
    (run / "step_4" / "trainer_state.pt").write_text("")
    assert model_dir(str(run / "step_2")) == str(run / "step_2")
    with pytest.raises(FileNotFoundError, match="run folder"):
        model_dir(str(tmp_path))  # no checkpoint, no warm-up model
    assert model_dir(str(run)) == str(run / "step_4")  # no pointer yet: the newest step
    (run / "latest").write_text("step_2\n")
    assert model_dir(str(run / "latest")) == str(run / "step_2")
    (run / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match="names 'step_9'"):
        model_dir(str(run / "latest"))
    for d in ("step_2", "step_4"):
        (run / d / "config.json").unlink()
    assert model_dir(str(run)) == str(run / "warmup")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        model_dir(str(tmp_path / "nope"))
