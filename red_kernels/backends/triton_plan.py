"""Launch plan of the Triton backend: kernel variants, tile configs, vocabulary splits, the autotune key.

Batch invariance: a token's log p and entropy must not depend on what else is in the batch. So the vocabulary
split boundaries depend on V alone (never on the row count N or the SM count), the autotune key holds a bucketed
N (`n_bucket`; the autotuner caches the winner per key, on disk too where Triton supports it), and
RED_KERNELS_TRITON_CONFIG pins one tile config for every call (bitwise-reproducible across N buckets and
processes). Within one config a row's bits depend only on its own inputs, V, H, dtype and the split layout:
tests/kernels/test_triton_plan.py checks logp(x[j:k]) == logp(x)[j:k] in the interpreter, test_triton_gpu.py on
a GPU (any rows with a pinned config, rows of one N bucket under autotuning).

Variants (RED_KERNELS_TRITON_VARIANT, read at every call; default 'baseline' = the original kernels):
  baseline  2-D grid (token blocks × splits), natural-exp epilogue, backward in row chunks
  grouped   1-D grid, GROUP_N token blocks per group, for L2 reuse of X blocks and W tiles
  lean      triton_lean.py: host-folded constants, exp2, int32 compares, unmasked interior tiles
  vsplit    backward chunks along the vocabulary: each fp32 dW slice is written once per row chunk (the loss
            path then takes the stats of all rows first, then this backward: `wants_vocab_chunks`)
  fused3    the loss path keeps the fp32 logits chunk: 3 GEMMs + chunk traffic instead of 4 GEMMs
  fast      grouped + lean + vsplit
A comma-separated list of the features (grouped, lean, vsplit, fused3) works too, e.g. 'lean,vsplit'.
"""

from __future__ import annotations

import os

import triton

FEATURES = ("grouped", "lean", "vsplit", "fused3")
VARIANTS = {
    "baseline": frozenset(),
    "grouped": frozenset({"grouped"}),
    "lean": frozenset({"lean"}),
    "vsplit": frozenset({"vsplit"}),
    "fused3": frozenset({"fused3"}),
    "fast": frozenset({"grouped", "lean", "vsplit"}),
}
GROUP_N = 8  # token blocks per program group ('grouped')
SPLIT_ALIGN = 256  # split starts are multiples of this (≥ every BLOCK_V, so GPU tiles never straddle)
SPLIT_COLS = 16_384  # target columns per vocabulary split: V = 151,936 → 10 splits, 320 programs at N = 4096
N_BUCKETS = (256, 16_384)  # n_bucket range: powers of two

# BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages (every BLOCK_V divides SPLIT_ALIGN). Half-precision inputs
# (tensor-core dots) and fp32 inputs (exact FMA dots: the fp32 operand tiles need registers, so smaller tiles)
# get their own lists; tests/kernels/test_triton_compile.py compiles each for sm_90 and asserts no spills.
# Every half config keeps BLOCK_N·BLOCK_V / (32·num_warps) = 64 fp32 accumulators per thread: with 128, ptxas
# spilled (128×256 on 8 warps: 80 B in the forward; 128×128 on 4 warps: 56 B in dlogits, 152 B in lean dZ), and
# 16 warps cap a thread at 128 registers (128×256 on 16 warps: 16 B spilled in lean dZ with a softcap); 128×64
# on 4 warps spilled 32 B in dlogits with a softcap.
CONFIG_SHAPES = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
)
FP32_CONFIG_SHAPES = ((64, 64, 32, 4, 2), (32, 128, 32, 4, 2), (64, 128, 16, 8, 2))


def config_shapes(fp32: bool) -> tuple:
    return FP32_CONFIG_SHAPES if fp32 else CONFIG_SHAPES


def gpu_configs(fp32: bool = False) -> list:
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, v, k, w, s in config_shapes(fp32)
    ]


def variant(name: str | None = None) -> frozenset:
    """The feature set of `name`, else of RED_KERNELS_TRITON_VARIANT (default 'baseline')."""
    name = (name if name is not None else os.environ.get("RED_KERNELS_TRITON_VARIANT") or "baseline").strip()
    if name in VARIANTS:
        return VARIANTS[name]
    feats = frozenset(f.strip() for f in name.split(",") if f.strip())
    if not feats or not feats <= set(FEATURES):
        raise ValueError(
            f"RED_KERNELS_TRITON_VARIANT={name!r}: use one of {sorted(VARIANTS)} or a comma-separated "
            f"subset of {FEATURES}"
        )
    return feats


def fixed_config(spec: str | None = None, fp32: bool = False):
    """The tile config pinned by RED_KERNELS_TRITON_CONFIG (or `spec`), or None (autotune).

    Accepted: 'default' (the first config of the input dtype's list), an index into that list (CONFIG_SHAPES, or
    FP32_CONFIG_SHAPES for fp32 inputs), or 'BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages' (e.g. '128,128,64,8,3')."""
    spec = (spec if spec is not None else os.environ.get("RED_KERNELS_TRITON_CONFIG") or "").strip()
    if not spec:
        return None
    shapes = config_shapes(fp32)
    try:
        if spec == "default":
            shape = shapes[0]
        elif spec.isdigit():
            shape = shapes[int(spec)]
        else:
            shape = tuple(int(p) for p in spec.split(","))
            assert len(shape) == 5 and all(v > 0 for v in shape)
            assert all(v & (v - 1) == 0 for v in shape[:3]) and SPLIT_ALIGN % shape[1] == 0
    except (ValueError, IndexError, AssertionError):
        raise ValueError(
            f"RED_KERNELS_TRITON_CONFIG={spec!r}: use 'default', an index 0..{len(shapes) - 1}, or "
            f"'BLOCK_N,BLOCK_V,BLOCK_K,num_warps,num_stages' with power-of-two blocks and BLOCK_V "
            f"dividing {SPLIT_ALIGN}"
        ) from None
    n, v, k, w, s = shape
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)


def n_bucket(n: int) -> int:
    """The autotune key's row count: the next power of two of n, clamped to N_BUCKETS."""
    lo, hi = N_BUCKETS
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def split_layout(vocab: int, vocab_splits: int | None = None, align: int = SPLIT_ALIGN) -> tuple[int, int]:
    """(splits, cols_per_split) of the forward grid: a function of V alone (and an explicit override).

    Every split is non-empty and starts at a multiple of `align`."""
    if vocab_splits is None:
        vocab_splits = triton.cdiv(vocab, SPLIT_COLS)
    vocab_splits = max(1, min(int(vocab_splits), triton.cdiv(vocab, align)))
    cols = triton.cdiv(triton.cdiv(vocab, vocab_splits), align) * align
    return triton.cdiv(vocab, cols), cols
