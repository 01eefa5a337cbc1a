"""Every output path of a run (`output_dir/...`) and the one atomic-write helper.

metrics.jsonl  samples.jsonl  warmup_metrics.jsonl  summary.json  dynamics.png  tb/
warmup/        (HF model after the warm-up stage)
step_N/        (checkpoint: HF model + tokenizer, trainer_state.pt, rng_rank{r}.pt)
latest         (name of the newest complete step_N, written last)
config.yaml    (the config the run was started with; never overwritten)
config_history.jsonl (the changes each resume made, allowed by checkpoint.allow_changes)
run.lock       (pid, host, start time of the one run writing here; removed when it ends)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import shutil
import socket

_STEP = re.compile(r"^step_(\d+)$")
log = logging.getLogger("red.run_dir")


class RunLockError(RuntimeError):
    """Another live run writes to the same output_dir; the message names it."""


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), telling a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """One writer per run folder: `output_dir/run.lock` holds {pid, host, started, proc_start} of the run that
    writes there. A second run stops with a RunLockError naming the holder; a lock left by a dead process on
    this host (kill -9, a crash) is taken over with a warning. Use as a context manager."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "run.lock")
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "proc_start": _proc_start(os.getpid()),
        }

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as fh:
                h = json.load(fh)
            return h if isinstance(h, dict) and isinstance(h.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock: the file is written whole under a unique name and hard-linked into place (link fails
        if the lock exists), so a crash never leaves a torn lock. A taken lock is examined, and a stale one
        removed and replaced, only while holding an exclusive flock on the run folder: two runs that find the
        same stale lock cannot both remove it (the second would otherwise delete the first's fresh lock and
        link its own, and both would write here)."""
        mine = f"{self.path}.{self.me['pid']}.{self.me['host']}"
        with open(mine, "w") as fh:
            json.dump(self.me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            try:
                os.link(mine, self.path)
                return
            except FileExistsError:
                pass
            with self._takeover_guard():
                for _ in range(3):
                    try:
                        os.link(mine, self.path)
                        return
                    except FileExistsError:
                        self._take_over_or_raise()
            raise RunLockError(f"{self.path}: could not take the lock (another run keeps taking it)")
        finally:
            os.remove(mine)

    @contextlib.contextmanager
    def _takeover_guard(self):
        """An exclusive flock on the run folder (blocking) while a taken lock is examined and replaced; a no-op
        where flock is missing (not POSIX)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _take_over_or_raise(self) -> None:
        h = self._holder()
        if h is None:
            log.warning("%s is unreadable: taken over", self.path)
        elif h.get("host") != self.me["host"] or _alive(h["pid"], h.get("proc_start")):
            raise RunLockError(
                f"{os.path.dirname(self.path)} is in use by another run: pid {h['pid']} on host "
                f"{h.get('host')}, started {h.get('started')} (lock file {self.path}). Wait for it to "
                f"end, choose another output_dir, or delete the lock file if that run is gone."
            )
        else:
            log.warning(
                "%s: the run that held it (pid %d on %s, started %s) is gone: lock taken over",
                self.path,
                h["pid"],
                h.get("host"),
                h.get("started"),
            )
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def release(self) -> None:
        h = self._holder()
        if h and h.get("pid") == self.me["pid"] and h.get("host") == self.me["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def json_ready(x):
    """NaN -> null and ±inf -> "inf"/"-inf", recursively, so every JSON file a run or a comparison writes is
    strict JSON (jq, JavaScript), e.g. the mean length of correct answers when there are none."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def temporary(path: str) -> str:
    """The temporary sibling `path` is written through: `.tmp_<name>` (RunDir.clear removes leftovers)."""
    return os.path.join(os.path.dirname(path) or ".", f".tmp_{os.path.basename(path)}")


def commit(tmp: str, path: str) -> None:
    """Rename a finished temporary into place, replacing a previous file or directory `path`."""
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic(path: str):
    """Write `path` (a file or a directory) through its temporary sibling, committed on success. Yields the
    temporary path; a failure leaves any previous `path` untouched."""
    tmp = temporary(path)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    yield tmp
    commit(tmp, path)


def write_text(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class RunDir:
    NAMES = (
        "metrics.jsonl",
        "samples.jsonl",
        "warmup_metrics.jsonl",
        "summary.json",
        "dynamics.png",
        "latest",
        "warmup",
        "config.yaml",
        "config_history.jsonl",
    )

    def __init__(self, root: str):
        self.root = root
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.samples = os.path.join(root, "samples.jsonl")
        self.warmup_metrics = os.path.join(root, "warmup_metrics.jsonl")
        self.summary = os.path.join(root, "summary.json")
        self.plot = os.path.join(root, "dynamics.png")
        self.tensorboard = os.path.join(root, "tb")
        self.warmup = os.path.join(root, "warmup")
        self.latest_file = os.path.join(root, "latest")
        self.config = os.path.join(root, "config.yaml")
        self.config_history = os.path.join(root, "config_history.jsonl")

    def step(self, n: int) -> str:
        return os.path.join(self.root, f"step_{n}")

    def steps(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.root):
            return []
        return sorted(
            (int(m.group(1)), os.path.join(self.root, d))
            for d in os.listdir(self.root)
            if (m := _STEP.match(d)) and os.path.isdir(os.path.join(self.root, d))
        )

    def latest_name(self) -> str | None:
        """The name the `latest` pointer holds (e.g. "step_20"; it may dangle), None without a pointer."""
        if not os.path.exists(self.latest_file):
            return None
        with open(self.latest_file) as fh:
            return fh.read().strip() or None

    def latest(self) -> str | None:
        """The checkpoint the `latest` pointer names (None if there is none or it is dangling)."""
        name = self.latest_name()
        d = os.path.join(self.root, name) if name else None
        return d if d and os.path.isfile(os.path.join(d, "trainer_state.pt")) else None

    @staticmethod
    def step_of(ckpt_dir: str) -> int:
        return int(_STEP.match(os.path.basename(ckpt_dir)).group(1))

    def clear(self) -> None:
        """Remove a previous run's checkpoints and logs (checkpoint.resume=never)."""
        if not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if name in self.NAMES or _STEP.match(name) or name.startswith(".tmp_"):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def model_dir(path: str) -> str:
    """The HF model directory `path` stands for: a directory with config.json itself; a run's `latest` pointer
    file -> the checkpoint it names; a run folder -> its `latest` checkpoint, else its newest step_N, else its
    warm-up model. FileNotFoundError naming what was looked for otherwise."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        run = RunDir(os.path.dirname(path) or ".")
        name = run.latest_name()
        if name and os.path.isfile(os.path.join(run.root, name, "config.json")):
            return os.path.join(run.root, name)
        raise FileNotFoundError(f"{path}: names {name!r}, which is not a model directory in {run.root}")
    if os.path.isdir(path):
        run = RunDir(path)
        candidates = [run.latest()] + [d for _, d in reversed(run.steps())] + [run.warmup]
        for d in candidates:
            if d and os.path.isfile(os.path.join(d, "config.json")):
                return d
        raise FileNotFoundError(
            f"{path}: neither a model directory (config.json) nor a run folder with a checkpoint (step_N/, "
            "latest) or a warm-up model"
        )
    raise FileNotFoundError(f"{path}: no such model directory, run folder or `latest` pointer")
