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
from red.plan import Plan
from red.update import Policy, make_optimizer, old_policy_pass, policy_update, update

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


def two_updates(kind: str, groups, freeze: bool = False) -> tuple[dict, list]:
    """Two optimizer steps over `groups` of the shared batch: (full float32 state afterwards, grad norms).
    freeze: rows 0 and 1 get A = 0 and run in the plan's frozen part (no backward), each part padded to the
    most micro-batches any rank has, as the trainer's step does: with the split below only rank 1 has any."""
    from red_kernels import REDLossConfig
    from red_kernels.policy_loss import gradient_free

    cfg = REDLossConfig(loss_const=8.0)
    model, _ = tiny_model(seed=3)
    policy = Policy(model, "float32", kind, pad_id=0)
    opt, _ = make_optimizer(model, 1e-3, [0.9, 0.95], 0.0, 10, 0, 0.1)
    batch = make_batch(GROUPS, seed=2)
    if freeze:
        batch = batch.replace(advantage=torch.where(torch.arange(batch.B) < 2, 0.0, batch.advantage))
    batch = batch.select_groups(groups)
    _, mx = parallel.reduce(maxes={"m": len(token_budget_groups(batch.lengths.tolist(), BUDGET))})
    b = old_policy_pass(policy, batch, BUDGET, 1.0, int(mx["m"]))
    norms = []
    for _ in range(2):
        if not freeze:
            norms.append(policy_update(policy, b, cfg, BUDGET, opt, 1e9, GROUPS, int(mx["m"]))["grad_norm"])
            continue
        plan = Plan.build(b, BUDGET, 0, gradient_free=gradient_free(b.advantage, b.is_offline, cfg))
        _, most = parallel.reduce(maxes=dict(zip(("frozen", "first", "second"), plan.counts())))
        plan.pad((int(most["frozen"]), int(most["first"]), int(most["second"])))
        norms.append(update(policy, plan, cfg, opt, 1e9, GROUPS)["grad_norm"])
    return checkpoint.full_state(model), norms


def _worker(rank, world, port, kind, out, empty, freeze=False):
    init_rank(rank, world, port)
    try:
        # ranks hold different numbers of groups (micro-batches); `empty`: rank 1 holds none (all dropped there)
        split = {0: list(range(GROUPS)), 1: []} if empty else {0: list(range(2, GROUPS)), 1: [0, 1]}
        result = two_updates(kind, split[rank], freeze)
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


@pytest.fixture(scope="module")
def frozen_reference():
    return two_updates("ddp", list(range(GROUPS)), freeze=True)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_a_frozen_part_on_one_rank_only_reproduces_the_one_process_update(tmp_path, frozen_reference, kind):
    """Rank 1 runs its two sequences without backward, rank 0 has none to freeze: the padded parts keep the
    wrappers' collectives in step, and the weights match the one-process update."""
    out = str(tmp_path / "state.pt")
    mp.spawn(_worker, args=(2, free_port(), kind, out, False, True), nprocs=2, join=True)
    (got, norms), (reference, ref_norms) = torch.load(out), frozen_reference
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    flat = [torch.cat([st[k].reshape(-1) for k in sorted(st)]) for st in (got, reference)]
    rel = float((flat[0] - flat[1]).norm() / flat[1].norm())  # relative to all weights, as above
    assert rel < 1e-4, rel
