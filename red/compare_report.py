"""The human-readable side of `red.compare`: compare.md (the table a paper prints) and compare.png (curves)."""

from __future__ import annotations

import math

from .run_dir import write_text


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ci(d: dict, scale=100.0, fmt="{:.1f}") -> str:
    lo, hi = d["ci95"]
    if any(v is None or math.isnan(v) for v in (lo, hi)):
        return "n/a"
    return f"[{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def write_markdown(res: dict, path: str, command: str) -> None:
    b, base, arms = res["budget"], res["baseline"], res["arms"]
    split = "held-out" if res.get("split", "heldout") == "heldout" else res["split"]
    lines = [
        f"# red.compare: {', '.join(arms)} ({b['config']})",
        "",
        f"Budget per run (every arm unless its overrides say otherwise): {b['train_steps']} steps x "
        f"{b['prompts_per_step']} prompts x group {b['group_size']} ({b['samples']} samples), response budget "
        f"{b['max_new_tokens']} tokens; SFT steps by arm: {b['sft_steps']}. Common overrides: "
        f"`{' '.join(b['overrides']) or '-'}`. Seeds: {res.get('seeds')}.",
        "",
        "Arms: "
        + "; ".join(f"`{n}` = {d['mode']} {' '.join(d['overrides']) or ''}".strip() for n, d in arms.items()),
        "",
        f"{split.capitalize()} accuracy (greedy unless eval.n/temperature say otherwise) after training; mean "
        f"over seeds with a Student-t 95% interval; the difference to `{base}` is paired by seed. H_on end: mean "
        "online token entropy (nats) over the last steps (collapse towards uniform above 0.8 ln V).",
        "",
        f"| arm | seeds | {split} acc % | 95% CI | Δ vs {base} (pts) | 95% CI | H_on end | len mean | "
        "len correct | len wrong | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if res.get("base"):
        accs = [v["accuracy"] for v in res["base"].values()]
        lines.append(f"| base (warm-up) | {len(accs)} | {_pct(_mean(accs))} | | | | | | | | |")
    for m, d in arms.items():
        runs, acc = d["runs"], d["heldout_acc"]
        p = res["paired_vs_baseline"].get(m)
        delta = ("—", "—") if p is None else (_num(100 * p["diff_mean"]) if p["n"] else "n/a", _ci(p))
        ent = d.get("final_entropy_online", {}).get("mean")
        lines.append(
            f"| {m} | {acc['n']} | {_pct(acc['mean'])} | {_ci(acc)} | {delta[0]} | {delta[1]} | "
            f"{_num(ent, '{:.2f}')} | {_num(d['len_mean']['mean'])} | "
            f"{_num(_mean([r['len_correct_mean'] for r in runs]))} | "
            f"{_num(_mean([r['len_wrong_mean'] for r in runs]))} | "
            f"{_num(_mean([r['wall_s'] for r in runs]), '{:.0f}')} |"
        )
    sources = sorted(
        {s for d in arms.values() for r in d["runs"] for s in r.get("heldout_acc_per_source", {})}
    )
    if len(sources) > 1:
        lines += [
            "",
            f"{split.capitalize()} accuracy % by source (mean over seeds):",
            "",
            "| arm | " + " | ".join(sources) + " |",
            "|---|" + "---|" * len(sources),
        ]
        if res.get("base"):
            lines.append(
                "| base (warm-up) | "
                + " | ".join(
                    _pct(_mean([v["per_source"].get(s) for v in res["base"].values()])) for s in sources
                )
                + " |"
            )
        for m, d in arms.items():
            lines.append(
                f"| {m} | "
                + " | ".join(
                    _pct(_mean([r["heldout_acc_per_source"].get(s) for r in d["runs"]])) for s in sources
                )
                + " |"
            )
    lines += [
        "",
        "Per run:",
        "",
        f"| arm | seed | {split} acc % | len mean | H_on end | 0.8 ln V | teacher-only share | wall s | output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, d in arms.items():
        for r in d["runs"]:
            lines.append(
                f"| {m} | {r['seed']} | {_pct(r['heldout_acc'])} | {_num(r['len_mean'])} | "
                f"{_num(r.get('final_entropy_online'), '{:.2f}')} | {_num(r.get('entropy_limit'), '{:.2f}')} | "
                f"{_num(r.get('teacher_only_share'), '{:.2f}')} | "
                f"{_num(r['wall_s'], '{:.0f}')} | `{r['output_dir']}` |"
            )
    if res.get("failed"):
        lines += [
            "",
            "FAILED runs (see their train.log): "
            + ", ".join(f"{f['arm']} seed {f['seed']}" for f in res["failed"]),
        ]
    v = res["versions"]
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Code: commit {v.get('git_commit', 'unknown')}{' (dirty)' if v.get('git_dirty') else ''}; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("git_commit", "git_dirty")),
        "",
    ]
    write_text(path, "\n".join(lines))


def _curve(runs: list[list[dict]], key: str):
    """(steps, mean, min, max) over the seeds that logged `key` at a step."""
    by_step: dict = {}
    for rows in runs:
        for r in rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step.setdefault(r["step"], []).append(v)
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def write_plot(metrics: dict[str, list[list[dict]]], path: str) -> None:
    """metrics: arm -> one metrics.jsonl row list per seed. Mean line, min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("held-out accuracy", [("eval/acc", "-")]),
        ("response length (tokens)", [("eval/len_mean", "-"), ("len_online_mean", ":")]),
        ("entropy (nats)", [("H_on", "-"), ("H_off", "--")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (title, keys) in zip(axes, panels):
        for i, (mode, runs) in enumerate(metrics.items()):
            color = f"C{i}"
            for key, style in keys:
                steps, mean, lo, hi = _curve(runs, key)
                if not steps:
                    continue
                ax.plot(
                    steps,
                    mean,
                    style,
                    color=color,
                    marker="o" if key.startswith("eval/") else None,
                    ms=3,
                    label=f"{mode} {key}" if len(keys) > 1 else mode,
                )
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[1].set_title("response length: held-out (solid), training online (dotted)")
    axes[2].set_title("entropy: H_on (solid), H_off (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
