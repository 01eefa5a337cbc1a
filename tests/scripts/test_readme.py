"""The README's CPU commands run as written: every `.venv/bin/python -m red.…` line of its bash blocks (not
marked GPU, not needing another experiment first), in order, in a scratch folder beside ../shared, with
`.venv/bin/python` as this interpreter and overrides appended that shrink the run (steps, sizes)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHRINK = {  # appended to each command of that module: the same code path at a tiny size
    "red.train": [
        "train.steps=2",
        "warmup.steps=2",
        "train.prompts_per_step=4",
        "rollout.n=4",
        "data.synthetic_train_size=64",
        "data.synthetic_eval_size=4",
        "eval.every=0",
        "log.progress=false",
        "checkpoint.every=0",
    ],
    "red.eval": ["--limit", "2", "--max-new-tokens", "8"],
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("&&")[-1].strip()
            if not cmd.startswith(".venv/bin/python -m red."):
                continue
            comment = cmd.partition("#")[2]
            if "GPU" in comment or "after " in comment:
                continue
            cmd = cmd.partition("#")[0].strip()
            if cmd not in out:  # the same command twice (two sections) runs once
                out.append(cmd)
    return out


def test_the_readme_lists_the_cpu_commands():
    cmds = readme_commands()
    assert ".venv/bin/python -m red.train" in cmds
    assert any(c.startswith(".venv/bin/python -m red.eval --model runs/red-default/latest") for c in cmds)


@pytest.mark.slow
def test_readme_cpu_commands_run_as_written(tmp_path):
    shared = ROOT.parent / "shared"
    if not (shared / "data" / "math500.jsonl").exists():
        pytest.skip("../shared/data is not beside this checkout")
    work = tmp_path / "repo"
    (work / "red" / "configs").mkdir(parents=True)
    (tmp_path / "shared").symlink_to(shared)
    for cfg in (ROOT / "red" / "configs").iterdir():
        (work / "red" / "configs" / cfg.name).symlink_to(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in readme_commands():
        args = shlex.split(cmd)
        module = args[2]
        args = [sys.executable, *args[1:], *SHRINK[module]]
        p = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
    assert (work / "runs" / "red-default" / "latest").is_file()
