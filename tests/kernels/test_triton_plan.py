"""The Triton backend's launch plan and numerics policies, on CPU: batch invariance (split layout and tile
config independent of N; bitwise equal rows in the interpreter), the pinned-config and variant switches, the dZ
buffer dtype (fp16 must not flush small gradients), and fp32-output GEMMs (never rounded to bf16)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_logprobs import make_inputs, run_op, upstream

from red_kernels import backends, linear_logprobs
from red_kernels.backends import triton_plan as plan
from red_kernels.reference import reference_logprobs

T = backends.ops("triton")


def _recorded_launches(monkeypatch, n, vocab, hidden=16):
    """(kernel name, integer launch arguments) of one stats() call on n rows, without running the kernel."""
    seen = []
    monkeypatch.setattr(
        T,
        "_launch",
        lambda name, grid, args, flags, *rest: seen.append(
            (name, tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool)))
        ),
    )
    x = torch.zeros(n, hidden)
    T.stats(x, torch.zeros(vocab, hidden), None, torch.zeros(n, dtype=torch.long), backends.LogitMap())
    return seen[0]


@pytest.mark.parametrize("variant", ["baseline", "lean", "grouped"])
def test_split_layout_and_bucket_do_not_depend_on_rows(variant, monkeypatch):
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", variant)
    layouts = {}
    for n in (1, 100, 4096, 16_384, 100_000):
        name, ints = _recorded_launches(monkeypatch, n, 151_936)
        m, vocab, hidden, cols, splits, bucket = ints[:6]
        assert (m, vocab, hidden) == (n, 151_936, 16)
        layouts[n] = (splits, cols)
        assert bucket == plan.n_bucket(n)
    assert set(layouts.values()) == {plan.split_layout(151_936)} == {(10, 15_360)}
    assert splits * 32 >= 2 * 132  # ≥ 2 programs per H100 SM at N = 4096 (32 blocks of 128 rows)
    # the autotune key's row count is constant within a bucket
    assert {plan.n_bucket(n) for n in range(2049, 4097, 97)} == {4096}
    assert plan.n_bucket(1) == plan.N_BUCKETS[0] and plan.n_bucket(10**6) == plan.N_BUCKETS[1]


def test_pinned_config_and_variant_switches(monkeypatch):
    monkeypatch.delenv("RED_KERNELS_TRITON_CONFIG", raising=False)
    assert plan.fixed_config() is None
    for spec, shape in (
        ("default", plan.CONFIG_SHAPES[0]),
        ("3", plan.CONFIG_SHAPES[3]),
        ("64,128,32,4,2", (64, 128, 32, 4, 2)),
    ):
        monkeypatch.setenv("RED_KERNELS_TRITON_CONFIG", spec)
        cfg = plan.fixed_config()
        assert (
            cfg.kwargs["BLOCK_N"],
            cfg.kwargs["BLOCK_V"],
            cfg.kwargs["BLOCK_K"],
            cfg.num_warps,
            cfg.num_stages,
        ) == shape
    for bad in ("9", "128,100,64,8,3", "128,512,64,8,3", "big"):
        with pytest.raises(ValueError, match="RED_KERNELS_TRITON_CONFIG"):
            plan.fixed_config(bad)
    assert plan.variant("fast") == {"grouped", "lean", "vsplit"} and plan.variant("lean,vsplit") == {
        "lean",
        "vsplit",
    }
    monkeypatch.delenv("RED_KERNELS_TRITON_VARIANT", raising=False)
    assert plan.variant() == frozenset()
    with pytest.raises(ValueError, match="RED_KERNELS_TRITON_VARIANT"):
        plan.variant("turbo")


def _row_invariant_dot(monkeypatch):
    """The interpreter runs tl.dot as one numpy matmul of the whole tile, and the host BLAS need not give a row
    the same bits at another row position (OpenBLAS on AMD EPYC does not). A GPU's MMA does. Each output row is
    computed by its own matmul here, so a failure can only come from how the kernel partitions the work."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    real = InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.ndim != 2 or a.dtype.primitive_bitwidth == 8:
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        rows = [np.matmul(a.data[i : i + 1], b.data, dtype=d.data.dtype) for i in range(a.data.shape[0])]
        return TensorHandle(np.concatenate(rows) + d.data, d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", dot)


@pytest.mark.parametrize("config", [None, "64,128,32,4,2"])
@pytest.mark.parametrize("variant", ["baseline", "lean", "fast"])
def test_rows_are_bitwise_batch_invariant_in_interpreter(variant, config, monkeypatch):
    """log p and entropy of a row do not depend on the other rows: logp(x[j:k]) == logp(x)[j:k], bit for bit,
    with the interpreter's tiles or a pinned GPU config (rows land at other positions of their token block)."""
    _row_invariant_dot(monkeypatch)
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", variant)
    if config:
        monkeypatch.setenv("RED_KERNELS_TRITON_CONFIG", config)
    x, w, y, b = make_inputs((150,), 40, 700, bias=True, ignore_frac=0.0, seed=31)
    lp, ent = linear_logprobs(x, w, y, bias=b, backend="triton")
    for j, k in ((0, 7), (37, 150), (5, 6)):
        lp_k, ent_k = linear_logprobs(x[j:k], w, y[j:k], bias=b, backend="triton")
        assert torch.equal(lp_k, lp[j:k]) and torch.equal(ent_k, ent[j:k]), (j, k)


def _small_grads_case():
    """Peaked softmax rows (x·10): most vocabulary entries get |dZ| far below fp16's 6e-8."""
    x, w, y, b = make_inputs((24,), 32, 400, bias=False, ignore_frac=0.0, seed=33, x_scale=10.0)
    return x.to(torch.float16), w.to(torch.float16), y


def _dw_rows(dz_dtype, monkeypatch):
    """Row norms of the driver's fp32 dW (before any cast to the parameter dtype) and of the float64 one."""
    x, w, y = _small_grads_case()
    monkeypatch.setattr(T, "gemm_dtype", lambda t: dz_dtype)
    a, c = upstream(y.shape, "mix")
    stats = backends.forward_stats(T, x, w, None, y, 1.0)
    _, dw, _ = backends.backward(T, x, w, None, y, 1.0, stats, a, c)
    _, _, (_, dw_r) = run_op(reference_logprobs, x, w, y, None, "mix", leaf_dtype=torch.float64)
    return dw.double().norm(dim=1), dw_r.norm(dim=1)


def test_fp16_inputs_get_a_dz_buffer_that_keeps_small_gradients(monkeypatch):
    """On a GPU fp16 inputs get a bf16 dZ buffer (fp32's exponent range): every row of the fp32 dW, even the
    ~1e-10 ones, keeps its size (an fp16 buffer, the choice before, flushes them to exactly zero)."""
    assert T.dz_dtype(torch.float16, cuda=True) == torch.bfloat16 == T.dz_dtype(torch.bfloat16, cuda=True)
    assert T.dz_dtype(torch.float16, cuda=False) == torch.float32
    chosen = T.dz_dtype(torch.float16, cuda=True)
    got, ref = _dw_rows(chosen, monkeypatch)
    tiny = ref < 1e-6 * ref.max()
    assert tiny.sum() >= 10  # the case has such rows
    assert ((got - ref).abs() <= 0.02 * ref).all()  # each row within bf16 rounding of float64
    flushed, _ = _dw_rows(torch.float16, monkeypatch)
    assert (flushed[tiny] == 0).any()  # what an fp16 buffer does


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dz_buffer_backward_matches_float64(dtype, monkeypatch):
    """The backward with a bf16 / fp16 dZ buffer (the GPU's GEMM operands) in the interpreter against float64."""
    x, w, y, b = make_inputs((30,), 48, 900, dtype=dtype, bias=True, seed=34)
    monkeypatch.setattr(T, "gemm_dtype", lambda t: dtype)
    from test_logprobs import check_against_reference

    check_against_reference("triton", x, w, y, b, tau=0.9, mode="mix", chunk_size=11)


def test_half_gemm_partials_are_never_rounded_and_the_path_is_logged(monkeypatch, caplog):
    """dW partials from bf16 operands keep fp32 precision (the old fallback rounded each chunk's product to bf16:
    ~4e-3 relative error), and the out_dtype support probe runs and logs once per call kind."""
    monkeypatch.setattr(backends, "_OUT_DTYPE_OK", {})
    g = torch.Generator().manual_seed(35)
    a, b = (torch.randn(64, 256, generator=g).bfloat16() for _ in range(2))
    want = a.double() @ b.double().t()
    out = torch.empty(64, 64)
    with caplog.at_level(logging.INFO, logger="red_kernels"):
        backends._mm_fp32(a, b.t(), out, acc=False)
        backends._mm_fp32(a, b.t(), out, acc=True)
        backends._mm_fp32(a, b.t(), out, acc=True)
    assert (out.double() - 3 * want).abs().max() <= 1e-5 * want.abs().max()
    probes = [r.getMessage() for r in caplog.records if "out_dtype" in r.getMessage()]
    assert (
        len(probes) == 2
        and any("torch.mm(" in p for p in probes)
        and any("torch.addmm(" in p for p in probes)
    )


def test_gpu_bench_dry_run_lists_every_variant_within_budget():
    """`python -m bench.gpu_bench --dry-run` (CPU) names every variant case the device run times, each with an
    estimate, and the total fits the stages' budgets."""
    import os
    import subprocess
    import sys

    from bench import gpu_variants

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bench", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for case, var in gpu_variants.variant_cases():
        assert any(case.id in ln and f" {var} " in ln and "skipped" not in ln for ln in lines), (case.id, var)
    assert set(plan.VARIANTS) <= {v for _, v in gpu_variants.variant_cases()}
    assert "within budget" in lines[-1], lines[-1]
