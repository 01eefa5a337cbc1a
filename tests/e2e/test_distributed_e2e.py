"""End-to-end `red.train` on 2 CPU ranks (gloo): a 2-step run with greedy rollouts reproduces the 1-process run's
checkpoint under ddp and fsdp2, with a small constant number of red's own collectives per step; and the
`torchrun ... train.parallel=fsdp2 model.dtype=bfloat16` command writes an HF-loadable checkpoint."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "red"))
from test_distributed import free_port, init_rank  # noqa: E402

pytestmark = pytest.mark.slow
ARGS = [
    "warmup.enabled=false",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1}",
    "train.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "rollout.temperature=0",
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=4",
    "algorithm.dynamic_sampling=false",
    "train.steps=2",
    "log.progress=false",
    "log.plot=false",
    "reward.workers=1",
    "optim.lr=1e-3",
    "train.micro_batch_tokens=128",
]
COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "barrier",
    "reduce_scatter_tensor",
    "all_gather",
)


def _rank(rank, port, out, kind, counts_path):
    init_rank(rank, 2, port)
    import red.step
    from red.train import main

    counter = {"n": 0}
    for name in COLLECTIVES:  # count the calls made from red's own modules (not the wrappers' internals)
        real = getattr(dist, name)

        def counted(*a, _real=real, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("red."):
                counter["n"] += 1
            return _real(*a, **k)

        setattr(dist, name, counted)
    per_step, real_step = [], red.step.rl_step

    def step(*a, **k):
        before = counter["n"]
        out_ = real_step(*a, **k)
        per_step.append(counter["n"] - before)
        return out_

    red.step.rl_step = step  # run_step looks rl_step up at call time
    assert main([f"output_dir={out}", f"train.parallel={kind}", *ARGS]) == 0
    if rank == 0:
        torch.save(per_step, counts_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from red.train import main

    out = str(tmp_path_factory.mktemp("one") / "run")
    assert main([f"output_dir={out}", *ARGS]) == 0
    return load_file(os.path.join(out, "step_2", "model.safetensors"))


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_rank_run_reproduces_the_one_process_checkpoint(tmp_path, one_process, kind):
    out, counts = str(tmp_path / "run"), str(tmp_path / "counts.pt")
    mp.spawn(_rank, args=(free_port(), out, kind, counts), nprocs=2, join=True)
    got = load_file(os.path.join(out, "step_2", "model.safetensors"))

    def flat(st):
        return torch.cat([st[k].reshape(-1) for k in sorted(st)])

    assert got.keys() == one_process.keys()
    assert float((flat(got) - flat(one_process)).norm() / flat(one_process).norm()) < 1e-4
    # per RL step: 1 before the old pass + 1 for the entropies + 1 for all metrics (dynamic sampling off: no refill
    # check), however many metrics there are
    assert torch.load(counts) == [3, 3]


def test_torchrun_fsdp2_bf16_writes_an_hf_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "red.train",
            "train.parallel=fsdp2",
            "model.dtype=bfloat16",
            f"output_dir={out}",
            *ARGS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out accuracy:" in res.stdout
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "step_2"), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(
        t.dtype == torch.bfloat16
        for t in load_file(os.path.join(out, "step_2", "model.safetensors")).values()
    )
    import json

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["precision"]["compute"] == "bfloat16" and summary["precision"]["params"] == "float32"
    state = torch.load(os.path.join(out, "step_2", "trainer_state.pt"), weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["master"].values())  # exact resume: fp32 master copy
