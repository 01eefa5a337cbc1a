"""red_loss forward+backward (RED and GRPO configurations) — naive, chunked torch, Triton (GPU), Liger GRPO."""

import pytest

from bench import cases


@pytest.mark.parametrize("case", cases.cases_for("loss", cases.DEVICE), ids=str)
def test_red_loss(bench_case, case):
    bench_case(case)
