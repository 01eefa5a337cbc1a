"""Render a results file as a markdown table and a PNG chart.

    python -m bench.report bench/results/<device>.json [--run -1]

writes bench/results/<device>.md and <device>.png next to the JSON (from the latest run by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cases import PEAK_TFLOPS

IMPL_ORDER = {"naive": 0, "torch": 1, "triton": 2, "liger": 3, "trl": 4, "liger_flsce": 5}
IMPL_LABEL = {
    "naive": "naive PyTorch",
    "torch": "red_kernels torch (chunked)",
    "triton": "red_kernels triton",
    "liger": "Liger-Kernel",
    "trl": "TRL ChunkedLogProbFunction",
    "liger_flsce": "Liger scaled CE",
}
PEER_IMPLS = ("naive", "trl", "liger_flsce")  # what linear_logprobs is compared against, case by case
MODE_LABEL = {
    "fwd": "forward",
    "fwdbwd": "fwd+bwd (log p + entropy)",
    "fwdbwd_noent": "fwd+bwd (log p only)",
    "red": "RED loss fwd+bwd",
    "grpo": "GRPO loss fwd+bwd",
}
# Headline comparisons: (label, op, mode, ours/theirs impls, metric, target ratio or None)
TARGETS = [
    ("linear_logprobs fwd+bwd, peak extra memory", "logprobs", "fwdbwd", "naive", "extra", 1 / 8),
    ("linear_logprobs fwd+bwd, time", "logprobs", "fwdbwd", "naive", "time", 1.5),
    ("linear_logprobs fwd+bwd without entropy, time", "logprobs", "fwdbwd_noent", "naive", "time", 1.5),
    ("RED loss fwd+bwd, time", "loss", "red", "naive", "time", 1.2),
    ("RED loss fwd+bwd, peak extra memory", "loss", "red", "naive", "extra", 1 / 8),
    ("GRPO loss fwd+bwd vs Liger GRPO (eager), time", "loss", "grpo", "liger", "time", 1.0),
    ("GRPO loss fwd+bwd vs Liger GRPO (eager), peak extra memory", "loss", "grpo", "liger", "extra", 1.0),
]


def _time(row):
    return row["time_s"]["median"] if row.get("time_s") else None


def _cpu(row):
    return row["time_s"].get("cpu_median") if row.get("time_s") else None


def _metric(row, metric):
    return {"time": _time, "cpu": _cpu}.get(metric, lambda r: r.get("extra_mib"))(row)


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _key(row):
    return (row["op"], row["mode"], row["model"], row["tokens"])


def _ratio(a, b):
    return None if a is None or not b else a / b


def render_rows(rows: list[dict]) -> str:
    """One markdown table: every case group, its implementations, time and memory (× = relative to naive)."""
    head = (
        "| op | shape (N × H × V, dtype) | impl | time ms | CPU-time ms | × naive | GEMMs | TFLOP/s | % of "
        f"{PEAK_TFLOPS:.0f} | peak MiB | extra MiB | extra × naive |"
    )
    groups: dict = {}
    for r in rows:
        if r["op"] != "trainer":
            groups.setdefault(_key(r), []).append(r)
    lines = [head, "|" + "---|" * 12] if groups else []
    for grp in groups.values():
        naive = next((r for r in grp if r["impl"] == "naive"), None)
        for r in sorted(grp, key=lambda r: IMPL_ORDER.get(r["impl"], 9)):
            t = _time(r)
            cells = [
                f"{r['op']} {MODE_LABEL.get(r['mode'], r['mode'])}",
                f"{r['model']}: {r['tokens']} × {r['hidden']} × {r['vocab']}, {r['dtype']}",
                IMPL_LABEL.get(r["impl"], r["impl"]) + (f" ({r['error']})" if r.get("error") else ""),
                _fmt(None if t is None else t * 1e3, ".1f"),
                _fmt(None if _cpu(r) is None else _cpu(r) * 1e3, ".0f"),
                _fmt(_ratio(t, naive and _time(naive)), ".2f"),
                str(r["gemms"]),
                _fmt(r.get("tflops"), ".3g"),
                _fmt(None if r.get("frac_peak") is None else 100 * r["frac_peak"], ".2g"),
                _fmt(r.get("peak_mib"), ".0f"),
                _fmt(r.get("extra_mib"), ".0f"),
                _fmt(_ratio(r.get("extra_mib"), naive and naive.get("extra_mib")), ".3f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    trainer = [r for r in rows if r["op"] == "trainer"]
    if trainer:
        lines += [
            "",
            "| trainer (median s per step) | mode | rollout | reward | old-policy pass | update | step | "
            "tokens/step | tokens/s | peak RSS MiB |",
            "|" + "---|" * 10,
        ]
        for r in trainer:
            p = r["phases"]
            lines.append(
                f"| `{r['command']}` | {r.get('mode', 'red')} | "
                + " | ".join(
                    f"{p[k]:.3f}"
                    for k in ("time_rollout", "time_reward", "time_old_pass", "time_update", "time_step")
                )
                + f" | {_fmt(p.get('tokens_per_step'), '.0f')} | {_fmt(p.get('tokens_per_s'), '.0f')}"
                f" | {_fmt(p.get('peak_rss_mib'), '.0f')} |"
            )
    return "\n".join(lines)


def render_peers(rows: list[dict]) -> str:
    """Markdown table of peer_ratios (empty string when no case has a peer next to ours)."""
    peers = peer_ratios(rows)
    if not peers:
        return ""
    lines = [
        "ratio = ours / peer, same case, same run (< 1: ours faster or leaner); memory = peak extra MiB.",
        "",
        "| case | ours | peer | time ms (ours / peer) | time ratio | CPU-time ratio | extra MiB (ours / peer)"
        " | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for q in peers:
        lines.append(
            f"| {q['case']} | {q['ours']} | {IMPL_LABEL.get(q['peer'], q['peer'])} | "
            f"{q['ours_ms']:.0f} / {q['peer_ms']:.0f} | {_fmt(q['time'], '.3f')} | {_fmt(q['cpu'], '.3f')}"
            f" | {_fmt(q['ours_mib'], '.0f')} / {_fmt(q['peer_mib'], '.0f')} | {_fmt(q['extra'], '.3f')} |"
        )
    return "\n".join(lines)


def peer_ratios(rows: list[dict]) -> list[dict]:
    """linear_logprobs, ours (torch on CPU, triton on GPU) against each peer measured in the same case group:
    ratios ours / peer of wall time, process CPU time and peak extra memory (< 1: ours is faster / leaner)."""
    out = []
    for r in rows:
        if (
            r["op"] != "logprobs"
            or r["impl"] != ("triton" if r["device"] == "cuda" else "torch")
            or not _time(r)
        ):
            continue
        for peer in (x for x in rows if _key(x) == _key(r) and x["impl"] in PEER_IMPLS and _time(x)):
            out.append(
                {
                    "case": f"{MODE_LABEL.get(r['mode'], r['mode'])}, {r['model']} N={r['tokens']}",
                    "ours": r["impl"],
                    "peer": peer["impl"],
                    "time": _ratio(_time(r), _time(peer)),
                    "cpu": _ratio(_cpu(r), _cpu(peer)),
                    "extra": _ratio(r.get("extra_mib"), peer.get("extra_mib")),
                    "ours_ms": _time(r) * 1e3,
                    "peer_ms": _time(peer) * 1e3,
                    "ours_mib": r.get("extra_mib"),
                    "peer_mib": peer.get("extra_mib"),
                }
            )
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The headline comparisons at Qwen2.5-0.5B (4096 tokens on CPU with the torch path, 16,384 on GPU with the
    Triton path): ratio ours / reference and whether it meets its target."""
    out = []
    for label, op, mode, ref_impl, metric, target in TARGETS:
        for r in rows:
            if r["op"] == "trainer":
                continue
            ours_impl = "triton" if r["device"] == "cuda" else "torch"
            n = 16_384 if r["device"] == "cuda" else 4096
            if (r["op"], r["mode"], r["model"], r["tokens"], r["impl"]) != (
                op,
                mode,
                "qwen2.5-0.5b",
                n,
                ours_impl,
            ):
                continue
            ref = next((x for x in rows if _key(x) == _key(r) and x["impl"] == ref_impl), None)
            if ref is None:
                continue
            ratio = _ratio(_metric(r, metric), _metric(ref, metric))
            cpu_ratio = _ratio(_cpu(r), _cpu(ref)) if metric == "time" else None
            out.append(
                {
                    "label": label,
                    "ours": ours_impl,
                    "ref": ref_impl,
                    "metric": metric,
                    "value": _metric(r, metric),
                    "ref_value": _metric(ref, metric),
                    "ratio": ratio,
                    "cpu_ratio": cpu_ratio,
                    "target": target,
                    "met": None if ratio is None else ratio <= target,
                }
            )
    return out


def render_run(run: dict) -> str:
    rows = run["results"]
    v = run.get("versions", {})
    git = run.get("git", {})
    lines = [
        f"# red-kernels benchmarks — {run.get('device')}",
        "",
        f"Recorded {run.get('timestamp')} · commit {str(git.get('commit'))[:10]}"
        f"{' (dirty tree)' if git.get('dirty') else ''} · torch {v.get('torch')} · triton {v.get('triton')}"
        f" · liger-kernel {v.get('liger_kernel')} · trl {v.get('trl')} · transformers {v.get('transformers')}",
        f"Machine: {run.get('machine', {}).get('cpu')}, {run.get('machine', {}).get('cpu_count')} cores,"
        f" load average at the end {run.get('machine', {}).get('load_avg')}",
    ]
    if run.get("note"):
        lines += ["", f"Note: {run['note']}"]
    tg = targets(rows)
    if tg:
        lines += [
            "",
            "## Targets",
            "",
            "ratio = ours / reference (wall time, or peak extra memory); CPU-time "
            "ratio uses process CPU time instead of wall time (less disturbed by other jobs).",
            "",
            "| comparison | ours | reference | ratio | CPU-time ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tg:
            unit, scale = ("ms", 1e3) if t["metric"] == "time" else ("MiB", 1)
            lines.append(
                f"| {t['label']} | {t['ours']}: {_fmt(t['value'] and t['value'] * scale, '.0f')} {unit}"
                f" | {t['ref']}: {_fmt(t['ref_value'] and t['ref_value'] * scale, '.0f')} {unit}"
                f" | {_fmt(t['ratio'], '.3f')} | {_fmt(t['cpu_ratio'], '.3f')} | ≤ {t['target']:.3g} |"
                f" {'—' if t['met'] is None else ('yes' if t['met'] else '**no**')} |"
            )
    peers = render_peers(rows)
    if peers:
        lines += ["", "## linear_logprobs against each peer", "", peers]
    if run.get("liger_flsce_path"):
        lines += ["", f"Liger scaled CE ran: {run['liger_flsce_path']}"]
    lines += [
        "",
        "## All cases",
        "",
        "time: median wall time of one call (fwd+bwd includes the backward); CPU-time: median process CPU "
        "time (all threads) of one call, CPU runs only. GEMMs: [N,H]×[H,V] sweeps the "
        "implementation performs; TFLOP/s counts 2·N·H·V per GEMM. peak MiB: memory growth during the call "
        "over its inputs; extra MiB: that minus the outputs and gradients it returns (a lower bound when the "
        "peak comes before an output exists).",
        "",
        render_rows(rows),
    ]
    return "\n".join(lines) + "\n"


def plot(run: dict, png: Path) -> Path:
    """Horizontal bars of time and peak extra memory per case and implementation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        (r for r in run["results"] if r["op"] != "trainer" and _time(r)),
        key=lambda r: (_key(r), IMPL_ORDER.get(r["impl"], 9)),
    )
    labels = [f"{r['op']} {r['mode']} {r['model']} N={r['tokens']} · {r['impl']}" for r in rows]
    colors = [f"C{IMPL_ORDER.get(r['impl'], 4)}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 1.5), sharey=True)
    for ax, vals, title in (
        (axes[0], [_time(r) * 1e3 for r in rows], "time per call (ms)"),
        (axes[1], [max(r.get("extra_mib") or 0, 1e-3) for r in rows], "peak extra memory (MiB)"),
    ):
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(f"red-kernels benchmarks — {run.get('device')} ({run.get('timestamp')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(path: Path, run_index: int = -1) -> Path:
    """Write <stem>.md and <stem>.png next to the results JSON at `path`; returns the .md path."""
    path = Path(path)
    run = json.loads(path.read_text())["runs"][run_index]
    md = path.with_suffix(".md")
    md.write_text(render_run(run))
    plot(run, path.with_suffix(".png"))
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="bench/results/<device>.json")
    p.add_argument("--run", type=int, default=-1, help="which recorded run (default: the latest)")
    a = p.parse_args(argv)
    md = write_report(a.results, a.run)
    print(md.read_text())


if __name__ == "__main__":
    main()
