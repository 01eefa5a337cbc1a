"""GPU-only checks of the compiled Triton kernels (marker `cuda`: collected everywhere, deselected by
tests/conftest.py unless RED_KERNELS_TEST_DEVICE=cuda; bench/gpu_check.sh runs them).

* batch invariance, bit for bit: a token's log p and entropy do not depend on the other rows. With a pinned tile
  config (RED_KERNELS_TRITON_CONFIG) for any row subset; under autotuning for subsets in the same N bucket (the
  autotuner may pick another config for another bucket, which changes the summation order);
Each GPU tile config's compiled-path correctness against float64 is test_triton_variants.py's
test_each_gpu_tile_config, which pins every config (baseline and lean) and runs on the GPU under
RED_KERNELS_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import pytest
import torch
from test_logprobs import make_inputs

from red_kernels import linear_logprobs

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("variant", ["baseline", "fast"])
@pytest.mark.parametrize("config", [None, "default", "2"])
def test_rows_are_bitwise_batch_invariant_on_gpu(variant, config, monkeypatch):
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", variant)
    if config is None:
        monkeypatch.delenv("RED_KERNELS_TRITON_CONFIG", raising=False)
        subsets = ((0, 3000), (1000, 3100), (4000, 4096))  # rows 2049..4096: the same N bucket
    else:
        monkeypatch.setenv("RED_KERNELS_TRITON_CONFIG", config)
        subsets = ((0, 3000), (1000, 3100), (0, 7), (5, 6), (100, 1200))
    x, w, y, b = make_inputs((4096,), 896, 151_936, dtype=torch.bfloat16, ignore_frac=0.0, seed=41)
    lp, ent = linear_logprobs(x, w, y, backend="triton")
    for j, k in subsets:
        lp_k, ent_k = linear_logprobs(x[j:k], w, y[j:k], backend="triton")
        assert torch.equal(lp_k, lp[j:k]) and torch.equal(ent_k, ent[j:k]), (config, j, k)
