"""red/host_memory.py: the heap trimmer hands free heap pages back to the OS (resident memory falls), does nothing
below its threshold or when disabled, and the update calls it after every micro-batch."""

import sys

import pytest
import torch
from conftest import tiny_model
from test_batching import make_batch
from test_update import _Recorder

from red.batching import token_budget_groups
from red.host_memory import HeapTrimmer
from red.update import Policy, policy_update

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not HeapTrimmer().available, reason="needs Linux glibc >= 2.33"
)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


@glibc
def test_trimming_returns_free_heap_pages_to_the_os():
    trimmer = HeapTrimmer(min_free_mib=32)
    trimmer()  # start from a trimmed heap
    # 64 KiB blocks come from the heap (below the mmap threshold); freeing every other one leaves ~100 MiB of
    # free chunks between live ones, which the heap's top trim cannot return
    blocks = [torch.ones(16384) for _ in range(3200)]
    del blocks[::2]
    assert trimmer.free_bytes() > 64 * 2**20
    before, trims = _rss_mib(), trimmer.trims
    assert trimmer() and trimmer.trims == trims + 1
    assert _rss_mib() < before - 50
    assert not HeapTrimmer(min_free_mib=1e9)()  # below the threshold: no trim
    del blocks


def test_a_disabled_trimmer_does_nothing():
    t = HeapTrimmer(enabled=False)
    assert not t.available and t.free_bytes() == 0 and not t() and t.trims == 0


def test_the_update_calls_the_trimmer_after_every_micro_batch():
    from red_kernels import REDLossConfig

    model, tok = tiny_model(seed=0)
    calls = []

    class Counting:
        def __call__(self):
            calls.append(torch.is_grad_enabled())
            return False

    policy = Policy(model, pad_id=tok.pad_token_id)
    policy.trimmer = Counting()
    b = make_batch(7, seed=1)
    rec = _Recorder(model.parameters())
    policy_update(policy, b, REDLossConfig(loss_const=8.0), 12, rec, 1e9, b.B, use_old=False)
    assert len(calls) == len(token_budget_groups(b.lengths.tolist(), 12)) > 2
