"""Resume is exact or refused, never silently fresh (issue 24, cases 1, 6 and 9): a dangling or unloadable
`latest` falls back to the newest complete checkpoint with a warning naming both; no complete checkpoint stops
the run with nothing deleted; metrics rows past the checkpoint and a torn last line are dropped with a log line;
a crafted pickle in trainer_state.pt is refused without being run."""

import logging
import os
import shutil

import pytest
import torch
from conftest import metric_steps, tiny_args

from red.metrics import trim_for_resume
from red.train import main


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run with checkpoints step_2 and step_4."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    assert main(tiny_args(out, 4)) == 0
    assert metric_steps(out) == [0, 1, 2, 3, 4]
    return out


class Marker:
    """Unpickling this creates `path`: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _break(ckpt: str, how: str, marker: str) -> None:
    path = os.path.join(ckpt, "trainer_state.pt")
    if how == "missing":
        os.remove(path)
    elif how == "torn":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif how == "pickle":
        state = torch.load(path, weights_only=True)
        state["trainer"]["hook"] = Marker(marker)
        torch.save(state, path)


@pytest.mark.parametrize("how", ["missing", "torn", "pickle"])
def test_an_unusable_latest_falls_back_to_the_newest_complete_checkpoint(base_run, tmp_path, caplog, how):
    out, marker = str(tmp_path / "run"), str(tmp_path / "pickle-ran")
    shutil.copytree(base_run, out)
    _break(os.path.join(out, "step_4"), how, marker)
    with open(os.path.join(out, "metrics.jsonl"), "a") as fh:  # and a crash tore the last metrics row
        fh.write('{"step": 5, "lo')
    if how == "pickle":  # the crafted file is live: an unsafe load would run it
        torch.load(os.path.join(out, "step_4", "trainer_state.pt"), weights_only=False)
        assert os.path.exists(marker)
        os.remove(marker)
    with caplog.at_level(logging.INFO):
        assert main(tiny_args(out, 6, "checkpoint.allow_changes=[train.steps]")) == 0
    assert not os.path.exists(marker), "the pickle in trainer_state.pt was executed"
    warn = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert (
        len(warn) == 1
        and "step_4" in warn[0]
        and warn[0].rstrip().endswith("step_2, the newest complete checkpoint")
    )
    msgs = [r.getMessage() for r in caplog.records]
    assert any("2 row(s) after step 2" in m for m in msgs)  # steps 3, 4 of the old run
    assert any("torn last line 6" in m for m in msgs)
    assert metric_steps(out) == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_2", "step_4", "step_6"]


def test_no_complete_checkpoint_stops_and_deletes_nothing(base_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    for s in ("step_2", "step_4"):
        os.remove(os.path.join(out, s, "trainer_state.pt"))
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    assert main(tiny_args(out, 6, "checkpoint.allow_changes=[train.steps]")) == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and "step_2" in err and "step_4" in err
    assert "Traceback" not in err
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics


def test_unsafe_rng_file_is_refused_too(base_run, tmp_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "pickle-ran")
    shutil.copytree(base_run, out)
    for s in ("step_2", "step_4"):
        torch.save({"torch": Marker(marker)}, os.path.join(out, s, "rng_rank0.pt"))
    assert main(tiny_args(out, 6, "checkpoint.allow_changes=[train.steps]")) == 2
    assert not os.path.exists(marker)


def test_metrics_trim_repairs_a_torn_line_and_drops_rows_past_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        trim_for_resume(str(path), 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'
    msgs = [r.getMessage() for r in caplog.records]
    assert any("torn last line 5" in m for m in msgs) and any("1 row(s) after step 2" in m for m in msgs)


def test_a_full_or_read_only_output_folder_names_the_path(tmp_path, monkeypatch, capsys):
    import errno

    import red.train as train_mod

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(train_mod, "write_text", full)
    assert main(tiny_args(str(tmp_path / "run"), 2)) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'run' / 'config.yaml'}: No space left on device (ENOSPC)" in err
    assert "Traceback" not in err


def test_metrics_trim_refuses_a_broken_middle_line(tmp_path):
    from red.metrics import MetricsFileError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl, line 2: expected one JSON object"):
        trim_for_resume(str(path), 2)
