"""The compiled path without a GPU: every Triton kernel lowered for sm_90 (H100) through the ptxas in the triton
wheel, with the specialisation production uses (16-byte aligned pointers, strides of 1 as constants, H and V
divisible by 16), then checked: no register spills (ptxas log), shared memory ≤ 227 KiB per block, tensor-core
instructions (wgmma / mma) in the PTX for bf16/fp16 inputs.

The default run compiles a representative subset (every config of both lists once, every kernel, every dtype, bias
and no bias, grouped / STORE_Z / softcap once: 11 compiles, 22 s measured on the shared 2-core machine);
`test_every_config_compiles_clean` (marked slow: 104 compiles, 235 s measured) compiles every config × kernel ×
dtype × bias. The compile runs in a subprocess (TRITON_INTERPRET=0 there), `python tests/kernels/test_triton_compile.py
SPEC_JSON` prints one JSON line per kernel.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMEM_LIMIT = 227 * 1024  # H100 / H200: max dynamic shared memory per block
H, V = 1536, 151_936  # the headline shape: what H % BLOCK_K and V % BLOCK_V specialise on
KERNELS = ("forward", "dlogits", "lean_forward", "lean_dlogits")
DTYPES = ("bf16", "fp16", "fp32")


def _signature_and_consts(fn, dtype, cfg, bias, softcap, extra):
    """ASTSource signature, constexprs and attrs as the JIT builds them for contiguous production inputs."""
    ptr = {
        "x_ptr": dtype,
        "w_ptr": dtype,
        "b_ptr": dtype,
        "y_ptr": "i64",
        "dz_ptr": "bf16" if dtype != "fp32" else "fp32",
    }
    floats = {"tau", "scale", "softcap", "k_in", "k_out", "k_t", "k_d"}
    ints16 = {"H": H, "V": V, "stride_xm": H, "stride_wv": H, "cols_per_split": 15_360, "stride_dzm": V}
    sig, consts, attrs = {}, dict(cfg), {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("stride_xh", "stride_wh"):
            sig[name], consts[name] = "constexpr", 1  # ints equal to 1 are specialised to constants
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
            if name in ints16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    consts.update(
        HAS_BIAS=bias,
        HAS_SOFTCAP=softcap,
        UPCAST=False,
        INPUT_PRECISION="ieee" if dtype == "fp32" else None,
        **extra,
    )
    return sig, {k: v for k, v in consts.items() if k in fn.arg_names}, attrs


def compile_one(spec):
    """Compile one kernel for sm_90 and return its registers, spills, shared memory and tensor-core use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from red_kernels.backends import triton_kernels as K
    from red_kernels.backends import triton_lean as L
    from red_kernels.backends import triton_plan as plan

    n, v, k, warps, stages = plan.config_shapes(spec["dtype"] == "fp32")[spec["config"]]
    if spec["kernel"] == "dz_from_logits":  # the 3-GEMM path's elementwise kernel: the launcher's fixed tiles
        n, v, warps, stages = 16, 512, 4, 1
    fns = {
        "forward": K.forward_stats_kernel,
        "dlogits": K.dlogits_kernel,
        "lean_forward": L.lean_forward_kernel,
        "lean_dlogits": L.lean_dlogits_kernel,
        "dz_from_logits": K.dz_from_logits_kernel,
    }
    fn = fns[spec["kernel"]]
    extra = dict(
        GROUP_N=spec.get("group", 0), STORE_Z=spec.get("store_z", False), EVEN_K=H % k == 0, EVEN_V=V % v == 0
    )
    sig, consts, attrs = _signature_and_consts(
        fn,
        spec["dtype"],
        dict(BLOCK_N=n, BLOCK_V=v, BLOCK_K=k),
        spec["bias"],
        spec.get("softcap", False),
        extra,
    )
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v output is printed
        kernel = triton.compile(
            ASTSource(fn, sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    text = log.getvalue()
    spills = [
        int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    ptx = kernel.asm["ptx"]
    return dict(
        spec,
        regs=max(regs, default=-1),
        spills=sum(spills) if spills else -1,
        shared=kernel.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"),
        mma=ptx.count("mma.sync"),
        cubin=len(kernel.asm["cubin"]),
    )


def run_specs(specs, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        TRITON_CACHE_DIR=str(tmp_path),
        TRITON_DUMP_PTXAS_LOG="1",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run(
        [sys.executable, __file__, json.dumps(specs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def check(results):
    assert results
    for r in results:
        assert r["cubin"] > 0 and r["regs"] > 0, r
        assert r["spills"] == 0, f"register spills: {r}"
        assert r["shared"] <= SMEM_LIMIT, f"shared memory over {SMEM_LIMIT} B: {r}"
        if r["dtype"] != "fp32" and r["kernel"] != "dz_from_logits":
            assert r["wgmma"] + r["mma"] > 0, f"no tensor-core instruction in the PTX: {r}"


def _n_configs(dtype):
    from red_kernels.backends import triton_plan as plan

    return len(plan.config_shapes(dtype == "fp32"))


def representative_specs():
    """Every config of both lists once, cycling through the kernels, bias on/off and bf16/fp16; plus grouped
    program ids with STORE_Z, a softcap, and the 3-GEMM path's elementwise dZ kernel."""
    kernels = itertools.cycle(KERNELS)
    specs = [
        dict(kernel=next(kernels), dtype=("bf16", "fp16")[c % 2], bias=c % 2 == 0, config=c)
        for c in range(_n_configs("bf16"))
    ]
    specs += [
        dict(kernel=next(kernels), dtype="fp32", bias=c % 2 == 1, config=c) for c in range(_n_configs("fp32"))
    ]
    specs += [
        dict(kernel="forward", dtype="bf16", bias=True, config=0, group=8, store_z=True),
        dict(kernel="lean_dlogits", dtype="bf16", bias=False, config=1, group=8, softcap=True),
        dict(kernel="dz_from_logits", dtype="bf16", bias=False, config=0, softcap=True),
    ]
    return specs


def test_representative_configs_compile_clean(tmp_path):
    specs = representative_specs()
    assert {s["kernel"] for s in specs} >= set(KERNELS) and {s["dtype"] for s in specs} == set(DTYPES)
    assert {s["bias"] for s in specs} == {True, False}
    for dtype in ("bf16", "fp32"):
        assert {s["config"] for s in specs if (s["dtype"] == "fp32") == (dtype == "fp32")} == set(
            range(_n_configs(dtype))
        )
    results = run_specs(specs, tmp_path)
    assert len(results) == len(specs)
    check(results)


@pytest.mark.slow
def test_every_config_compiles_clean(tmp_path):
    specs = [
        dict(kernel=k, dtype=d, bias=b, config=c)
        for k, d, b in itertools.product(KERNELS, DTYPES, (False, True))
        for c in range(_n_configs(d))
    ]
    results = run_specs(specs, tmp_path)
    assert len(results) == len(specs)
    check(results)


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        print(json.dumps(compile_one(spec)), flush=True)
