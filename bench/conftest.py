"""pytest wiring for the benchmarks: `pytest bench/ --benchmark-only [--record] [--record-note TEXT]`.

Every benchmark stores a results row (time, TFLOP/s, peak extra memory) in benchmark.extra_info and in a list
printed as a markdown table at the end; --record (or BENCH_RECORD=1) appends the run to
bench/results/<device>.json and rewrites bench/results/<device>.md.
"""

import os

import torch

if not torch.cuda.is_available():
    # Liger's fused linear CE is a Triton kernel: on CPU it can only run in Triton's interpreter. Must be set
    # before liger_kernel (or any @triton.jit module) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench import cases, impls, measure, record  # noqa: E402

ROWS: list[dict] = []


def pytest_addoption(parser):
    g = parser.getgroup("red-kernels bench")
    g.addoption(
        "--record",
        action="store_true",
        default=os.environ.get("BENCH_RECORD") == "1",
        help="append this run to bench/results/<device>.json and rewrite the .md table",
    )
    g.addoption(
        "--record-note",
        default=os.environ.get("BENCH_NOTE", ""),
        help="free text stored with the recorded run (e.g. 'machine shared with other jobs')",
    )


@pytest.fixture
def bench_rows():
    """The session's results rows (for benchmarks that are not a cases.Case, e.g. the trainer)."""
    return ROWS


@pytest.fixture
def bench_case(benchmark):
    """bench_case(case): time one case with pytest-benchmark, measure its peak extra memory, keep its row."""

    def run_case(case: cases.Case):
        ok, why = impls.available(case)
        if not ok:
            pytest.skip(why)
        run = impls.build(case, cases.make_inputs(case))
        warmup, rounds = cases.schedule(case)
        measured = measure.MeasuredRun(run, case.device, measure_call=warmup)
        benchmark.group = case.group
        benchmark.name = case.impl
        benchmark.pedantic(measured, rounds=rounds, warmup_rounds=warmup, iterations=1)
        stats = benchmark.stats.stats
        row = record.make_row(
            case,
            list(stats.data),
            measured.extra_bytes,
            peak_bytes=measured.peak_bytes,
            cpu_times=measured.cpu_times if case.device == "cpu" else None,
        )
        benchmark.extra_info.update(
            {k: row[k] for k in ("gemms", "tflop", "tflops", "frac_peak", "peak_mib", "extra_mib")}
        )
        ROWS.append(row)

    return run_case


def pytest_terminal_summary(terminalreporter, config):
    if not ROWS:
        return
    from bench import report

    terminalreporter.write_sep("=", "red-kernels benchmark summary")
    terminalreporter.write_line(report.render_rows(ROWS))
    peers = report.render_peers(ROWS)
    if peers:
        terminalreporter.write_line("\nlinear_logprobs against each peer\n" + peers)
    if config.getoption("record"):
        device = next((r["device"] for r in ROWS if r["op"] != "trainer"), "cpu")
        name = record.device_name(device)
        path = record.append_run(
            record.RESULTS_DIR / f"{name}.json",
            record.environment(device, config.getoption("record_note")),
            ROWS,
        )
        md = report.write_report(path)
        terminalreporter.write_line(f"recorded: {path} and {md}")
