"""The Triton kernel variants side by side on one GPU, and the paper model they are read against.

    python -m bench.gpu_bench --variants-only    # time VARIANT_POINTS × their variants (gpu_check.sh does this)
    python -m bench.gpu_bench --dry-run          # CPU: every case and variant the device run times, with estimates
    python -m bench.gpu_variants                 # the paper table of bench/VARIANTS.md

A variant is selected by RED_KERNELS_TRITON_VARIANT (red_kernels/backends/triton_plan.py), read at every call, so
one process times them all. The variants stage pins one tile config (RED_KERNELS_TRITON_CONFIG, default 'default'
unless the environment sets it): the rows compare the variants' features on the same tiles, and each variant
kernel compiles once instead of once per autotune config (the autotuned baseline is the cases stage's 'triton'). Rows are the usual results rows (record.make_row) with a "variant" key, stored in the
run's "variants" list of the same <device>.json.

Paper model (H100 SXM, bf16; kernels.md): t = GEMM + epilogue + traffic, with
  GEMM      = sweeps · 2·N·H·V / (GEMM_EFF · 800 TFLOP/s)
  epilogue  = logit passes · N·V · ops per logit / (132 SMs · 128 fp32 lanes · 1.83 GHz) (not overlapped with the
              MMAs in a Triton kernel without warp specialisation)
  traffic   = HBM bytes / 3 TB/s beyond what the GEMMs overlap: dZ chunks (written once, read by the dX and dW
              GEMMs), the fp32 dW read-modify-write per row chunk, W re-reads per row chunk, kept fp32 logits.
Each term is an estimate to read the first run against, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cases

PEAK = cases.PEAK_TFLOPS * 1e12
HBM = 3e12
ALU = 132 * 128 * 1.83e9  # fp32 lane-ops per second
GEMM_EFF = 0.70  # sustained fraction of peak for the fused GEMM tiles (assumption)
OPS = {"baseline": (24, 20), "lean": (15, 13)}  # fp32 ops per logit: forward stats, dZ epilogue
DZ_BYTES = 1 << 28  # red_kernels/backends/triton.py _DZ_BYTES_CUDA
ROWS_PER_CHUNK_ALIGN = 64

# (op, mode, model, tokens, variants): the headline shape, the fill-the-device shape, the loss path
VARIANT_POINTS = (
    ("logprobs", "fwdbwd", "qwen2.5-1.5b", 16_384, ("baseline", "grouped", "lean", "vsplit", "fast")),
    ("logprobs", "fwd", "qwen2.5-0.5b", 4096, ("baseline", "grouped", "lean", "fast")),
    ("loss", "red", "qwen2.5-1.5b", 16_384, ("baseline", "fused3", "fast")),
)
COMPILE_S = 2.0  # one kernel × config compile on the GPU host (autotune compiles each config once)
CONFIGS = 5  # autotune configs per kernel (cases stage); the variants stage pins one


@dataclass(frozen=True)
class Estimate:
    gemm_ms: float
    epilogue_ms: float
    traffic_ms: float
    traffic_gb: float

    @property
    def total_ms(self) -> float:
        return self.gemm_ms + self.epilogue_ms + self.traffic_ms


def _feats(variant):
    from red_kernels.backends.triton_plan import variant as parse

    return parse(variant)


def paper(op: str, mode: str, n: int, h: int, v: int, variant: str) -> Estimate:
    """Estimated time per call of red_kernels' Triton path at (N, H, V) bf16 under `variant` (model above)."""
    f = _feats(variant)
    backward = mode != "fwd"
    keep = op == "loss" and "fused3" in f and "vsplit" not in f  # vsplit takes the stats-then-backward path
    sweeps = (3 if keep else 4) if backward else 1
    gemm = sweeps * 2 * n * h * v / (GEMM_EFF * PEAK)
    ops_f, ops_b = OPS["lean" if "lean" in f and not keep else "baseline"]
    epi = n * v * (ops_f + (ops_b if backward else 0)) / ALU
    gb = 0.0
    if backward:
        dz = 3 * n * v * 2  # bf16 dZ: written once, read by two GEMMs
        if "vsplit" in f:
            chunks = -(-v // max(256, DZ_BYTES // 2 // n // 256 * 256))
            gb = dz + v * h * 4 + chunks * (2 * n * h * 4 + 2 * n * h * 2) + 2 * v * h * 2
        else:
            rows = max(
                ROWS_PER_CHUNK_ALIGN, DZ_BYTES // (v * 2) // ROWS_PER_CHUNK_ALIGN * ROWS_PER_CHUNK_ALIGN
            )
            chunks = -(-n // rows)
            gb = dz + (2 * chunks - 1) * v * h * 4 + chunks * 2 * v * h * 2  # dW RMW; W read by dZ + dX
        if keep:
            gb += 2 * n * v * 4  # fp32 logits kept: written, read back
    return Estimate(gemm * 1e3, epi * 1e3, gb / HBM * 1e3, gb / 1e9)


def x_thrash_gb(n: int, h: int, v: int, block_v: int = 128) -> float:
    """Worst case of the 2-D forward grid: X (N·H bf16) re-read from HBM for every vocabulary tile."""
    return n * h * 2 * (v / block_v) / 1e9


def variant_cases() -> list[tuple[cases.Case, str]]:
    return [
        (cases.Case(op, mode, model, n, "triton", "cuda"), var)
        for op, mode, model, n, variants in VARIANT_POINTS
        for var in variants
    ]


def device_seconds(
    case: cases.Case, variant: str, warmup: int = 2, reps: int = 10, first: bool = False
) -> float:
    """Estimated device seconds to time one case: warm-up + measured call + reps, plus autotune compiles when this
    is the first use of a variant's kernels (first=True)."""
    est = paper(case.op, case.mode, case.tokens, case.hidden, case.vocab, variant).total_ms / 1e3
    kernels = 1 if case.mode == "fwd" else 2
    return (warmup + 1 + reps) * est + (kernels * CONFIGS * COMPILE_S if first else 0.0)


def run(out_rows: list, budget_s: float, time_case) -> list:
    """Time every variant case (variant set through the environment, one pinned config), appending rows with a
    "variant" key."""
    import os
    import time

    from . import record

    os.environ.setdefault("RED_KERNELS_TRITON_CONFIG", "default")
    print(f"variants stage: RED_KERNELS_TRITON_CONFIG={os.environ['RED_KERNELS_TRITON_CONFIG']}", flush=True)
    start = time.perf_counter()
    for case, var in variant_cases():
        if time.perf_counter() - start > budget_s:
            out_rows.append(
                dict(record.make_row(case, None, None, error="not run: time budget spent"), variant=var)
            )
            continue
        old = os.environ.get("RED_KERNELS_TRITON_VARIANT")
        os.environ["RED_KERNELS_TRITON_VARIANT"] = var
        try:
            times, extra, peak = time_case(case)
            row = record.make_row(case, times, extra, peak_bytes=peak)
        except Exception as e:  # noqa: BLE001 — a compile error or OOM is a result
            row = record.make_row(case, None, None, error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            if old is None:
                os.environ.pop("RED_KERNELS_TRITON_VARIANT", None)
            else:
                os.environ["RED_KERNELS_TRITON_VARIANT"] = old
        est = paper(case.op, case.mode, case.tokens, case.hidden, case.vocab, var)
        row.update(variant=var, paper_ms=est.total_ms, config=os.environ["RED_KERNELS_TRITON_CONFIG"])
        if case.op == "loss" and "fused3" in _feats(var) and row["time_s"]:  # 3 GEMM sweeps performed, not 4
            row["gemms"], row["tflop"] = 3, row["tflop"] * 3 / 4
            row["tflops"] = row["tflop"] / row["time_s"]["median"]
            row["frac_peak"] = row["tflops"] / cases.PEAK_TFLOPS
        out_rows.append(row)
        ms = row["time_s"] and round(row["time_s"]["median"] * 1e3, 2)
        print(
            f"variant {var:9s} {case.id}: {ms} ms (paper {est.total_ms:.1f} ms)"
            f"{' ERROR ' + row['error'] if row['error'] else ''}",
            flush=True,
        )
    return out_rows


def table() -> str:
    """Markdown: per variant point and variant, the paper terms and total."""
    lines = [
        "| case | variant | GEMM ms | epilogue ms | traffic GB | traffic ms | total ms | 2-D grid X re-read, "
        "worst case GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, var in variant_cases():
        e = paper(case.op, case.mode, case.tokens, case.hidden, case.vocab, var)
        risk = "—" if "grouped" in _feats(var) else f"{x_thrash_gb(case.tokens, case.hidden, case.vocab):.0f}"
        lines.append(
            f"| {case.op} {case.mode} {case.model} N={case.tokens} | {var} | {e.gemm_ms:.1f} | "
            f"{e.epilogue_ms:.1f} | {e.traffic_gb:.1f} | {e.traffic_ms:.1f} | {e.total_ms:.1f} | {risk} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
