"""A few GRPO steps of TRL's GRPOTrainer (stock, or REDKernelsGRPOTrainer) on the trainer's tiny model, by phase.

    python -m bench.trl_step --trainer stock|red_kernels [--steps 3] [--prompts 4] [--group 8] [--max-new 32]

Same setup as `python -m red.train algorithm.mode=grpo` with the overrides of bench/test_bench_trainer.py: the
embedded default's tiny Qwen2 (red/configs/default.yaml model.tiny, seed 0) and tokenizer, prompts of its
synthetic task (data.train, with its chat template), `--prompts` prompts x `--group` completions per step of up to
`--max-new` tokens at temperature 1, one optimizer step per generation, no KL (beta 0), one thread. Phases are
measured by wrapping the trainer's own methods: time_rollout (`_generate`), time_reward (`_calculate_rewards`),
time_old_pass (log-prob passes without grad), time_update (the rest of the optimizer step: policy log-probs,
loss, backward, optimizer) and time_step (the whole step). Prints one JSON line: per-step phases and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
PHASES = ("time_rollout", "time_reward", "time_old_pass", "time_update", "time_step")


def _timed(trainer, name, bucket, timers, when=lambda: True):
    """Replace trainer.<name> by a wrapper adding its wall time to timers[bucket] when `when()` holds."""
    inner = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if when():
                timers[bucket] += time.perf_counter() - t

    setattr(trainer, name, wrapper)


def build(
    trainer_name: str,
    prompts: int,
    group: int,
    max_new: int,
    steps: int,
    out: Path,
    seed: int = 0,
    model_dir: str | None = None,
    task: str | None = None,
    template: str = "{problem}",
    reward: str = "answer",
):
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from red import synthetic
    from red_kernels.integrations.trl import REDKernelsGRPOTrainer

    cfg = OmegaConf.load(REPO / "red" / "configs" / "default.yaml")
    if model_dir:  # e.g. bench/smollm2_step.py's randomly initialised SmolLM2-135M
        from red.models import load_pretrained

        model, tok = load_pretrained(model_dir, "float32")
    else:
        tok = synthetic.build_tokenizer()
        model = synthetic.build_model(tok, OmegaConf.to_container(cfg.model.tiny), seed=seed)
    task = task or str(cfg.data.train).split(":", 1)[1]
    if task == "wordproblems":
        examples = synthetic.generate_word_problems(prompts * steps, seed=seed, split="train")
    else:
        examples = synthetic.generate(task, prompts * steps, seed=seed)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": template.replace("{problem}", ex["problem"])}] for ex in examples
            ],
            "answer": [ex["answer"] for ex in examples],
        }
    )

    def reward_answer(completions, answer, **kwargs):
        return [float(f"\\boxed{{{a}}}" in c[0]["content"]) for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(out),
        num_generations=group,
        per_device_train_batch_size=prompts * group,
        steps_per_generation=1,
        max_completion_length=max_new,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        max_steps=steps,
        learning_rate=float(cfg.optim.lr),
        logging_steps=1,
        seed=seed,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        shuffle_dataset=False,
    )
    cls = REDKernelsGRPOTrainer if trainer_name == "red_kernels" else GRPOTrainer
    if reward == "parity":  # bench/rewards.py: a learning signal for a model that solves nothing
        from bench.rewards import trl_reward as reward_fn
    else:
        reward_fn = reward_answer
    trainer = cls(model=model, reward_funcs=reward_fn, args=args, train_dataset=data, processing_class=tok)

    steps_out, timers = [], dict.fromkeys(PHASES, 0.0)
    _timed(trainer, "_generate", "time_rollout", timers)
    _timed(trainer, "_calculate_rewards", "time_reward", timers)
    _timed(
        trainer,
        "_get_per_token_logps_and_entropies",
        "time_old_pass",
        timers,
        lambda: not torch.is_grad_enabled(),
    )
    _timed(trainer, "_generate_and_score_completions", "_scoring", timers)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.update(dict.fromkeys((*PHASES, "_scoring"), 0.0))
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step = {p: timers[p] for p in PHASES}
            step["time_step"] = time.perf_counter() - self.t
            step["time_update"] = step["time_step"] - timers["_scoring"]
            steps_out.append(step)

    timers["_scoring"] = 0.0
    trainer.add_callback(StepTimer())
    return trainer, steps_out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=("stock", "red_kernels"), required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-trl-step"))
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    p.add_argument("--task", default=None, help="synthetic task of the prompts (default: data.train)")
    p.add_argument("--template", default="{problem}", help="prompt text around {problem}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--reward",
        choices=("answer", "parity"),
        default="answer",
        help="answer: \\boxed{answer} in the completion; parity: bench/rewards.py (non-zero advantages)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    trainer, steps = build(
        a.trainer, a.prompts, a.group, a.max_new, a.steps, a.out, 0, a.model, a.task, a.template, a.reward
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(
        json.dumps(
            {
                "trainer": a.trainer,
                "steps": steps,
                "loss": losses,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
