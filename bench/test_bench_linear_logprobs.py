"""linear_logprobs: forward; forward+backward with and without entropy — naive, chunked torch, Triton (GPU),
Liger fused linear CE (log-probs only)."""

import pytest

from bench import cases


@pytest.mark.parametrize("case", cases.cases_for("logprobs", cases.DEVICE), ids=str)
def test_linear_logprobs(bench_case, case):
    bench_case(case)
