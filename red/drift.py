"""Config drift on resume: the config a run is resumed with against the one its checkpoint was made with.

Any difference stops the run (ConfigDriftError, the diff printed) unless `checkpoint.allow_changes` names the key
or its section (e.g. `checkpoint.allow_changes=[optim.lr,train.steps]`, or `[eval]` for every eval key). Allowed
changes take effect and are appended to `output_dir/config_history.jsonl`; `output_dir/config.yaml`, written when
the run started, is never overwritten. Display-only keys and output_dir (a folder may be moved) never count.
"""

from __future__ import annotations

import datetime
import json
import os

from .checkpoint import ResumeError
from .config import Config, flatten

IGNORED = (
    "checkpoint.allow_changes",
    "log.progress",
    "log.plot",
    "output_dir",
)  # a moved folder is the same run


class ConfigDriftError(ResumeError):
    """A resume whose config differs from the checkpoint's in keys not allowed to change."""


def allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def diff(saved: dict, new: dict) -> dict:
    """{key: (saved value, new value)} for every differing key; a key the saved config predates counts as its
    schema default there."""
    default, a, b = flatten(Config().to_dict()), flatten(saved), flatten(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        old, cur = a.get(k, default.get(k)), b.get(k, default.get(k))
        if old != cur and k not in IGNORED:
            out[k] = (old, cur)
    return out


def check(saved: dict, new: dict, allow: list[str], ckpt_dir: str) -> dict:
    """The differences (all allowed) or ConfigDriftError listing the ones that are not."""
    changes = diff(saved, new)
    refused = {k: v for k, v in changes.items() if not allowed(k, allow)}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} -> {cur!r}" for k, (old, cur) in refused.items())
        keys = ",".join([*allow, *refused])
        raise ConfigDriftError(
            f"resuming {ckpt_dir} with a config that differs from the one it was made with:\n{lines}\n"
            f"Resume with the same settings, allow the change with checkpoint.allow_changes=[{keys}], or "
            f"choose another output_dir."
        )
    return changes


def record(root: str, step: int, changes: dict) -> None:
    """Append the allowed changes of a resume to config_history.jsonl (one JSON object per resume)."""
    row = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_at_step": step,
        "changes": {k: {"from": old, "to": cur} for k, (old, cur) in changes.items()},
    }
    with open(os.path.join(root, "config_history.jsonl"), "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
