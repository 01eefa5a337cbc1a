"""One writer per run folder (issue 24, case 2): a second run on the same output_dir stops naming the holder;
a lock left by a dead process on this host is taken over with a warning; the lock goes when the run ends."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest
from conftest import tiny_args

from red.run_dir import RunLock, RunLockError, _proc_start
from red.train import main


def _write_lock(root, pid, host=None):
    with open(os.path.join(root, "run.lock"), "w") as fh:
        json.dump(
            {
                "pid": pid,
                "host": host or socket.gethostname(),
                "started": "then",
                "proc_start": _proc_start(pid),
            },
            fh,
        )


def test_a_second_lock_on_the_same_folder_names_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunLockError) as e:
            RunLock(str(tmp_path)).acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
        assert "run.lock" in str(e.value)
    assert not os.path.exists(tmp_path / "run.lock")  # released
    with RunLock(str(tmp_path)):  # and free again
        pass


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    _write_lock(str(tmp_path), 1, host="some-other-node")
    with pytest.raises(RunLockError, match="pid 1 on host some-other-node"):
        RunLock(str(tmp_path)).acquire()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _write_lock(str(tmp_path), p.pid)
    with caplog.at_level(logging.WARNING), RunLock(str(tmp_path)):
        held = json.load(open(tmp_path / "run.lock"))
    assert held["pid"] == os.getpid()
    assert any(f"pid {p.pid}" in r.getMessage() and "taken over" in r.getMessage() for r in caplog.records)


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    with open(tmp_path / "run.lock", "w") as fh:  # our pid, but another process start time: a reused pid
        json.dump(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": "then", "proc_start": "1"}, fh
        )
    with RunLock(str(tmp_path)):
        assert json.load(open(tmp_path / "run.lock"))["proc_start"] == _proc_start(os.getpid())


def test_train_refuses_a_folder_in_use_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(str(out), holder.pid)
        assert main(tiny_args(str(out), 2)) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"is in use by another run: pid {holder.pid}" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "run.lock"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_two_runs_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    """Run A finds a stale lock and is about to replace it when run B finds the same stale lock: B must wait
    until A has replaced it, then see A's live lock and stop (before the flock guard, B removed A's fresh lock
    and linked its own, and both wrote to the folder)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # B's (live) identity
    try:
        _write_lock(str(tmp_path), dead.pid)
        a, b = RunLock(str(tmp_path)), RunLock(str(tmp_path))
        b.me = {**b.me, "pid": other.pid, "proc_start": _proc_start(other.pid)}
        inside, go = threading.Event(), threading.Event()
        take_over = a._take_over_or_raise

        def slow_take_over():  # A examines the stale lock, then waits inside the guard
            inside.set()
            assert go.wait(10)
            take_over()

        a._take_over_or_raise = slow_take_over
        outcome = {}

        def run_b():
            try:
                b.acquire()
                outcome["b"] = "acquired"
            except RunLockError as e:
                outcome["b"] = str(e)

        ta = threading.Thread(target=a.acquire)
        ta.start()
        assert inside.wait(10)
        tb = threading.Thread(target=run_b)
        tb.start()
        tb.join(0.5)
        assert tb.is_alive()  # B waits for A's takeover to finish
        go.set()
        ta.join(10)
        tb.join(10)
        assert json.load(open(tmp_path / "run.lock"))["pid"] == os.getpid()  # A holds it
        assert f"in use by another run: pid {os.getpid()}" in outcome["b"]
    finally:
        other.kill()
        other.wait()
