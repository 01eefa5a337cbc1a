"""What one GPU run will time and how long it should take (`python -m bench.gpu_bench --dry-run`, works on CPU),
and the variants stage of that run (`run_variants`, called by bench/gpu_bench.py).

Estimates per case: gpu_bench.time_case makes 2 warm-up calls, 1 memory-measured call and
max(3, min(10, 1 s / t)) timed calls of t seconds each; t comes from the paper model of bench/gpu_variants.py for
the Triton path, and from its GEMM count at 75 % of peak plus the logits traffic (bytes per logit below) for the
other implementations. The first call of each Triton kernel set adds its compiles (all autotune configs in the cases stage, the one
pinned config in the variants stage).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import cases, gpu_variants

# HBM bytes moved per logit beyond the GEMMs (materialised fp32 logits, log_softmax, entropy, backward: naive;
# fp32 chunks: torch/liger; bf16 chunk or tile-local: the peers' fused kernels)
BYTES_PER_LOGIT = {"naive": 40, "torch": 24, "liger": 16, "trl": 16, "liger_flsce": 8}
CUBLAS_EFF = 0.75


def call_seconds(case: cases.Case, variant: str = "baseline") -> float:
    if case.impl == "triton":
        return (
            gpu_variants.paper(case.op, case.mode, case.tokens, case.hidden, case.vocab, variant).total_ms
            / 1e3
        )
    gemm = case.flop / (CUBLAS_EFF * gpu_variants.PEAK)
    return gemm + case.tokens * case.vocab * BYTES_PER_LOGIT.get(case.impl, 24) / gpu_variants.HBM


def case_seconds(case: cases.Case, variant: str = "baseline", first: bool = False, configs: int = 1) -> float:
    """Device seconds of gpu_bench.time_case on `case`; first: the first use of its Triton kernels, which compiles
    `configs` tile configs per kernel (autotuning: all of them; the pinned variants stage: one)."""
    t = call_seconds(case, variant)
    reps = max(3, min(10, int(1.0 / max(t, 1e-6))))
    compile_s = 0.0
    if first and case.impl == "triton":
        compile_s = (1 if case.mode == "fwd" else 2) * configs * gpu_variants.COMPILE_S
    return (3 + reps) * t + compile_s


def dry_run(
    case_list,
    budget_s: float,
    variants_budget_s: float,
    with_cases: bool = True,
    with_variants: bool = True,
    priority=None,
) -> str:
    """Every case and variant the device run will time, each with its estimated device seconds, in run order;
    cases past the time budget are marked as gpu_bench would skip them."""
    lines, spent, seen = [], 0.0, set()
    if with_cases:
        lines.append(f"# cases (gpu_bench, budget {budget_s:.0f} s: no case starts after it)")
        for case in sorted(case_list, key=priority or (lambda c: 0)):
            key = ("autotuned", case.op, case.mode == "fwd")
            first = case.impl == "triton" and key not in seen
            s = case_seconds(case, first=first, configs=gpu_variants.CONFIGS)
            seen |= {key} if first else set()
            state = "run" if spent <= budget_s else "skipped (budget)"
            spent += s if state == "run" else 0.0
            lines.append(f"{case.id:55s} {s:6.1f} s  {state}")
        lines.append(f"cases total ≈ {spent:.0f} s")
    v_spent = 0.0
    if with_variants:
        lines.append(f"# variants (gpu_variants.VARIANT_POINTS, budget {variants_budget_s:.0f} s)")
        for case, var in gpu_variants.variant_cases():
            feats = sorted(gpu_variants._feats(var))
            key = (var, case.op, case.mode == "fwd")
            s = case_seconds(case, var, first=key not in seen)
            seen.add(key)
            state = "run" if v_spent <= variants_budget_s else "skipped (budget)"
            v_spent += s if state == "run" else 0.0
            lines.append(f"{case.id:55s} {var:9s} {s:6.1f} s  {state}  features={','.join(feats) or '-'}")
        lines.append(f"variants total ≈ {v_spent:.0f} s")
    total = spent + v_spent
    limit = budget_s + variants_budget_s
    lines.append(
        f"estimated device time {total:.0f} s for budgets of {limit:.0f} s: "
        f"{'within' if total <= limit * 1.1 else 'OVER'} budget"
    )
    return "\n".join(lines)


def run_variants(out_path: Path, env: dict, budget_s: float, time_case) -> list:
    """Time the variant cases and store their rows under "variants" in the last run of out_path (or a new run)."""
    out_path = Path(out_path)
    data = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    if not data["runs"] or data["runs"][-1].get("note") != env.get("note"):
        data["runs"].append({**env, "results": []})
    rows = gpu_variants.run([], budget_s, time_case)
    data["runs"][-1]["variants"] = rows
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    print(render(rows), flush=True)
    return rows


def render(rows) -> str:
    lines = [
        "| case | variant | median ms | paper ms | TFLOP/s | frac of 800 | extra MiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_s"]
        lines.append(
            f"| {r['id']} | {r['variant']} | {t and round(t['median'] * 1e3, 2)} | "
            f"{round(r.get('paper_ms') or 0, 1)} | {r['tflops'] and round(r['tflops'], 1)} | "
            f"{r['frac_peak'] and round(r['frac_peak'], 3)} | {r['extra_mib'] and round(r['extra_mib'])} | "
            f"{r['error'] or ''} |"
        )
    return "\n".join(lines)
