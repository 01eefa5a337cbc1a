"""Vocabulary-parallel linear_logprobs on 2 gloo CPU ranks against gathering the weight (issue 12).

Both variants run forward + backward (upstream gradients on log p and entropy) on every rank with the lm_head
sharded by vocabulary:
* `vocab_parallel`: `linear_logprobs(..., process_group=)` on the local shard (2 all-reduces of [N]/[3, N] fp32
  forward, a [world, 4] int64 layout gather, dX all-reduced backward);
* `gather_weight`: all-gather the shards into the full [V, H] weight, run the single-process op on it (every rank
  computes the full dW redundantly and keeps its shard: no gradient communication).
Bytes are those of the tensors each rank hands to collectives per call (counted by wrapping torch.distributed);
time is the median of a few calls measured inside rank 0. Results go to benchmark.extra_info (not the kernel
tables: this is a 2-process case).
"""

import json
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, H, V, WORLD, REPS = 512, 256, 16384, 2, 3


def _count_bytes(counter):
    """Wrap all_reduce/all_gather so that every call adds its tensors' bytes to counter[0]."""
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        counter[0] += t.numel() * t.element_size()
        return real_reduce(t, *a, **k)

    def all_gather(out, t, *a, **k):
        counter[0] += sum(o.numel() * o.element_size() for o in out)
        return real_gather(out, t, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _worker(rank, init_file, out_file):
    from red_kernels import linear_logprobs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.05
    y, a, c = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g), torch.randn(N, generator=g)
    rows = torch.tensor_split(torch.arange(V), WORLD)[rank]
    shard = w[int(rows[0]) : int(rows[-1]) + 1].clone()
    counter = [0]
    _count_bytes(counter)

    def vocab_parallel():
        xs, ws = x.clone().requires_grad_(), shard.clone().requires_grad_()
        lp, ent = linear_logprobs(xs, ws, y, process_group=dist.group.WORLD, backend="torch")
        ((lp * a).sum() + (ent * c).sum()).backward()

    def gather_weight():
        parts = [torch.empty(len(r), H) for r in torch.tensor_split(torch.arange(V), WORLD)]
        dist.all_gather(parts, shard)
        xs, wf = x.clone().requires_grad_(), torch.cat(parts).requires_grad_()
        lp, ent = linear_logprobs(xs, wf, y, backend="torch")
        ((lp * a).sum() + (ent * c).sum()).backward()

    result = {}
    for name, fn in (("vocab_parallel", vocab_parallel), ("gather_weight", gather_weight)):
        fn()  # warm-up
        counter[0] = 0
        times = []
        for _ in range(REPS):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"median_s": statistics.median(times), "bytes_per_call": counter[0] // REPS}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [WORLD])
def test_vocab_parallel_vs_gather_weight(benchmark, tmp_path, world):
    out = tmp_path / "result.json"

    def run():
        mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=world, join=True)

    benchmark.group = f"vocab-parallel logprobs fwd+bwd, {world} gloo CPU ranks: {N} × {H} × {V}, float32"
    benchmark.name = "vocab_parallel vs gather_weight"
    benchmark.pedantic(run, rounds=1, iterations=1)
    result = json.loads(out.read_text())
    benchmark.extra_info.update({f"{k}_{m}": v[m] for k, v in result.items() for m in v})
    print(json.dumps(result))
    assert result["vocab_parallel"]["bytes_per_call"] < result["gather_weight"]["bytes_per_call"]
