"""One rank of test_trl_fsdp2: stock trl.GRPOTrainer, then REDKernelsGRPOTrainer, each one optimizer step under
accelerate's FSDP2 (launched by `accelerate launch` with the test's config file) from the same saved model and the
same fixed rollouts. Rank 0 writes {"stock"|"red": {"loss", "grad_norm", "weights", "kernel_calls"}} as JSON to
argv[2] (kernel_calls: how many times red_kernels.linear_logprobs ran on this rank).

argv: model directory, output path.
"""

import json
import os
import sys

import datasets
import torch
import trl
from torch.distributed.tensor import DTensor

import red_kernels.integrations.trl as adapter
from red_kernels.integrations.trl import REDKernelsGRPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PROMPTS = ["12+7=", "3*4=", "9-5=", "8+8="]


def rollout_for(tok, vocab):
    def rollout_func(prompts, trainer):
        """Completions fixed by the prompt text (each rank gets its own prompts), the same for both trainers."""
        ids = [tok(p)["input_ids"] for p in prompts]
        completions = []
        for k, pid in enumerate(ids):
            g = torch.Generator().manual_seed(sum(pid) * 31 + k % 4)
            completions.append(torch.randint(3, vocab, (3 + k % 4,), generator=g).tolist())
        return {
            "prompt_ids": ids,
            "completion_ids": completions,
            "logprobs": [[-1.0] * len(c) for c in completions],
        }

    return rollout_func


def reward(completion_ids, **kwargs):
    return [float(sum(c) % 7) for c in completion_ids]


def _fsdp2_on_cpu(trainer):
    """accelerate selects FSDP only for accelerator devices (its CPU state is MULTI_CPU, i.e. DDP), so switch the
    constructed trainer's accelerator to FSDP2 before train(): its prepare() then applies fully_shard to each
    decoder layer and the root, exactly as on GPUs, over this gloo group."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen2DecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


CALLS = {"n": 0}
_op = adapter.linear_logprobs


def _counted(*args, **kwargs):
    CALLS["n"] += 1
    return _op(*args, **kwargs)


adapter.linear_logprobs = _counted


def run(cls, path, tok, out_dir):
    CALLS["n"] = 0
    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=out_dir,
        num_generations=4,
        per_device_train_batch_size=4,
        steps_per_generation=2,  # the old-policy pass runs; two micro-steps per generation
        max_completion_length=8,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        beta=0.05,
        loss_type="dapo",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    data = datasets.Dataset.from_dict({"prompt": PROMPTS})
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    trainer = cls(
        model=path,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        rollout_func=rollout_for(tok, vocab),
    )
    _fsdp2_on_cpu(trainer)
    trainer.train()
    head = trainer.model.get_output_embeddings().weight
    assert isinstance(head, DTensor), type(head)  # FSDP2 sharded the head: the full_tensor() path ran
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double()
        for n, p in trainer.model.named_parameters()
    }
    return {
        "kernel_calls": CALLS["n"],
        "loss": log["loss"],
        "grad_norm": log["grad_norm"],
        "weights": {n: w.flatten().tolist() for n, w in weights.items()},
    }


def main():
    path, out = sys.argv[1], sys.argv[2]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    result = {}
    for name, cls in (("stock", trl.GRPOTrainer), ("red", REDKernelsGRPOTrainer)):
        result[name] = run(cls, path, tok, os.path.join(os.path.dirname(out), name))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
