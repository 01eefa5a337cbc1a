"""Two CPU ranks (gloo, torch.multiprocessing) against one process: the update under train.parallel=ddp and
fsdp2 gives the same float32 weights as the 1-process update on the same batch (gradients really are reduced,
through the forward redirection of the fused loss), and a rank with nothing to train on still takes part."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from test_batching import make_batch

from red import checkpoint, parallel
from red.batching import token_budget_groups
from red.update import Policy, make_optimizer, old_policy_pass, policy_update

GROUPS, BUDGET = 8, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")


def two_updates(kind: str, groups) -> tuple[dict, list]:
    """Two optimizer steps over `groups` of the shared batch: (full float32 state afterwards, grad norms)."""
    from red_kernels import REDLossConfig

    model, _ = tiny_model(seed=3)
    policy = Policy(model, "float32", kind, pad_id=0)
    opt, _ = make_optimizer(model, 1e-3, [0.9, 0.95], 0.0, 10, 0, 0.1)
    batch = make_batch(GROUPS, seed=2).select_groups(groups)
    _, mx = parallel.reduce(maxes={"m": len(token_budget_groups(batch.lengths.tolist(), BUDGET))})
    b = old_policy_pass(policy, batch, BUDGET, 1.0, int(mx["m"]))
    norms = [
        policy_update(policy, b, REDLossConfig(loss_const=8.0), BUDGET, opt, 1e9, GROUPS, int(mx["m"]))[
            "grad_norm"
        ]
        for _ in range(2)
    ]
    return checkpoint.full_state(model), norms


def _worker(rank, world, port, kind, out, empty):
    init_rank(rank, world, port)
    try:
        # ranks hold different numbers of groups (micro-batches); `empty`: rank 1 holds none (all dropped there)
        split = {0: list(range(GROUPS)), 1: []} if empty else {0: list(range(2, GROUPS)), 1: [0, 1]}
        result = two_updates(kind, split[rank])
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return two_updates("ddp", list(range(GROUPS)))  # no process group: the 1-process path


@pytest.mark.parametrize("kind, empty", [("ddp", False), ("fsdp2", False), ("fsdp2", True)])
def test_two_ranks_reproduce_the_one_process_update(tmp_path, reference, kind, empty):
    out = str(tmp_path / "state.pt")
    mp.spawn(_worker, args=(2, free_port(), kind, out, empty), nprocs=2, join=True)
    (got, norms), (reference, ref_norms) = torch.load(out), reference
    # the gradient norm is the one of the summed full-batch gradient (AdamW itself would hide a scale error)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert got.keys() == reference.keys()
    moved = max(float((reference[k] - tiny_model(seed=3)[0].state_dict()[k]).abs().max()) for k in reference)
    assert moved > 1e-4  # the updates did something

    def flat(st):
        return torch.cat([st[k].reshape(-1) for k in sorted(st)])

    # relative to all weights: AdamW turns the round-off of gradients that are zero in exact arithmetic (the key
    # bias cannot change a softmax) into lr-sized steps of either sign, in both runs alike
    rel = float((flat(got) - flat(reference)).norm() / flat(reference).norm())
    assert rel < 1e-4, rel
