"""Plain-Python benchmark runner (no pytest-benchmark needed), for the GPU image.

    python -m bench.gpu_bench [--out DIR] [--budget-s 170] [--ops logprobs,loss] [--device cuda]
    python -m bench.gpu_bench --dry-run [--variants only|none]   # CPU: what a device run times, with estimates

Runs cases.gpu_cases (headline shape first), times each with triton.testing.do_bench after warm-up (the Triton
autotuning happens there), measures peak extra memory on one separate call, and writes the same results schema as the
pytest run to DIR/<device>.json (rewritten after every case, so a killed run keeps what it measured), then
DIR/<device>.md and .png. Cases that cannot run (no Liger, no red_loss) are skipped; failures (OOM, compile
errors) become rows with an "error". Cases not started when the time budget is spent are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from . import cases, impls, measure, record


def _priority(case: cases.Case):
    """Headline shape (Qwen2.5-0.5B at the device's largest token count) first, then larger token counts."""
    headline = 16_384 if case.device == "cuda" else 4096
    return (case.model != "qwen2.5-0.5b" or case.tokens != headline, -case.tokens, case.model)


def time_case(case: cases.Case, warmup: int = 2, max_reps: int = 10, target_s: float = 0.5):
    """(seconds per call list, extra bytes, peak bytes) for one case (see measure.py)."""
    run = impls.build(case, cases.make_inputs(case))
    for _ in range(warmup):
        run()
    measured = measure.MeasuredRun(run, case.device, measure_call=0)
    t0 = time.perf_counter()
    measured()
    once = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(target_s / max(once, 1e-6))))
    if case.device == "cuda":
        times = measure.time_cuda(run, rep_ms=target_s * 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times, measured.extra_bytes, measured.peak_bytes


def run_cases(case_list, out_path: Path, env: dict, budget_s: float = 170.0, **timing) -> list[dict]:
    """Benchmark `case_list` in priority order, rewriting `out_path` (one appended run) after each case."""
    out_path = Path(out_path)
    data = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    rows: list[dict] = []
    data["runs"].append({**env, "results": rows})
    start = time.perf_counter()
    for case in sorted(case_list, key=_priority):
        ok, why = impls.available(case)
        if not ok:
            print(f"skip {case.id}: {why}", flush=True)
            continue
        if time.perf_counter() - start > budget_s:
            rows.append(record.make_row(case, None, None, error="not run: time budget spent"))
            continue
        try:
            times, extra, peak = time_case(case, **timing)
            rows.append(record.make_row(case, times, extra, peak_bytes=peak))
        except Exception as e:  # noqa: BLE001 — an OOM or a compile error is a result worth recording
            traceback.print_exc()
            rows.append(record.make_row(case, None, None, error=f"{type(e).__name__}: {str(e)[:200]}"))
        finally:
            if case.device == "cuda":
                torch.cuda.empty_cache()
        r = rows[-1]
        print(
            f"{case.id}: {r['time_s'] and round(r['time_s']['median'] * 1e3, 2)} ms, "
            f"{r['tflops'] and round(r['tflops'], 1)} TFLOP/s, extra {r['extra_mib'] and round(r['extra_mib'])}"
            f" MiB{' ERROR ' + r['error'] if r['error'] else ''}",
            flush=True,
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=1) + "\n")
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=record.RESULTS_DIR, help="directory for <device>.json/.md/.png"
    )
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting new cases after this many s")
    p.add_argument("--ops", default="logprobs,loss")
    p.add_argument("--models", default=",".join(cases.MODELS), help="comma-separated subset of cases.MODELS")
    p.add_argument("--impls", default=",".join(cases.IMPLS), help="comma-separated subset of cases.IMPLS")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--note", default="")
    p.add_argument(
        "--variants",
        choices=("with", "only", "none"),
        default="with",
        help="also time the Triton kernel variants (bench/gpu_variants.py), only them, or not",
    )
    p.add_argument("--variants-budget-s", type=float, default=60.0, help="budget of the variants stage")
    p.add_argument(
        "--dry-run", action="store_true", help="list cases and variants with estimated device time"
    )
    a = p.parse_args(argv)
    device = "cuda" if a.dry_run else a.device
    case_list = [
        c
        for op in a.ops.split(",")
        for c in cases.cases_for(op, device)
        if c.model in a.models.split(",") and c.impl in a.impls.split(",")
    ]
    if a.dry_run:
        from .gpu_plan import dry_run

        print(
            dry_run(
                case_list,
                a.budget_s,
                a.variants_budget_s,
                with_cases=a.variants != "only",
                with_variants=a.variants != "none",
                priority=_priority,
            )
        )
        return
    out = a.out / f"{record.device_name(a.device)}.json"
    env = record.environment(a.device, a.note or "bench/gpu_bench.py")
    if any(c.impl == "liger_flsce" for c in case_list):
        env["liger_flsce_path"] = impls.liger_flsce_path(a.device)  # CuTe (Hopper) or the PyTorch fallback
        print("liger_flsce runs:", env["liger_flsce_path"], flush=True)
    if a.variants != "only":
        run_cases(case_list, out, env, a.budget_s)
    if a.variants != "none" and a.device == "cuda":
        from .gpu_plan import run_variants

        run_variants(out, env, a.variants_budget_s, time_case)
    from .report import write_report

    print(write_report(out).read_text())


if __name__ == "__main__":
    main()
