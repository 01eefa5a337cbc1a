"""The loop's lazy weight sync: the engine is loaded right before a generate that follows an optimizer step, never
otherwise (no sync in SFT steps; a level-2 sleep is always followed by a full load before generating)."""

import json

import red.rollout.factory as factory
from red.train import main

TINY = [
    "warmup.enabled=false",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 1}",
    "train.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=2",
    "eval.every=0",
    "log.progress=false",
    "log.plot=false",
    "reward.workers=1",
    "checkpoint.every=0",
    "algorithm.max_refill=0",
]


class CountingEngine:
    """Wraps the HF engine as if it were a separate engine (not colocated) and records every call."""

    colocated = False

    def __init__(self, inner, events, sleep_level=1):
        self.inner, self.events, self.sleep_level = inner, events, sleep_level
        self.weights_valid = True  # as VLLMEngine: False once a level-2 sleep discarded the weights

    def generate(self, prompts, n, sampling):
        assert self.weights_valid, "generate from discarded weights"
        self.events.append("generate")
        return self.inner.generate(prompts, n, sampling)

    def load_weights(self, named):
        self.events.append(f"load:{len(list(named))}")
        self.weights_valid = True

    def sleep(self):
        self.events.append("sleep")
        self.weights_valid = self.weights_valid and self.sleep_level < 2

    def wake(self):
        self.events.append("wake")

    def prompt_logprobs(self, token_ids):
        return self.inner.prompt_logprobs(token_ids)

    def close(self):
        self.events.append("close")


def test_sync_only_before_a_generate_that_follows_an_update(tmp_path, monkeypatch):
    events, real = [], factory.make_engine
    monkeypatch.setattr(factory, "make_engine", lambda *a, **k: CountingEngine(real(*a, **k), events))
    out = tmp_path / "run"
    assert (
        main(
            [
                f"output_dir={out}",
                "algorithm.mode=sft_then_grpo",
                "train.steps=4",
                "algorithm.sft_steps=2",
                *TINY,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r.get("mode") for r in rows[1:]] == ["sft", "sft", "grpo", "grpo"]
    n_params = int(events[events.index(next(e for e in events if e.startswith("load")))].split(":")[1])
    assert n_params > 0  # every parameter, each sync
    gens = [i for i, e in enumerate(events) if e == "generate"]
    loads = [i for i, e in enumerate(events) if e.startswith("load")]
    # eval before (no load: nothing trained), then 2 SFT steps (no load, no generate), then each grpo rollout and
    # the final eval generate after a load, except when the step before dropped every group (no update)
    assert gens[0] < loads[0]
    for i in loads:
        assert events[i + 1] == "wake" and events[i + 2] == "generate"  # right before generating
    skipped = sum(1 for r in rows[3:] if r.get("skipped_update"))
    assert len(loads) == 1 + (2 - skipped)  # after the SFT phase, then after each grpo update


def test_a_level_2_sleep_is_always_followed_by_a_load_before_generating(tmp_path, monkeypatch):
    events, real = [], factory.make_engine
    monkeypatch.setattr(
        factory, "make_engine", lambda *a, **k: CountingEngine(real(*a, **k), events, sleep_level=2)
    )
    # grpo on a random model: every group is dropped, no optimizer step, yet the weights were discarded by sleep
    assert main([f"output_dir={tmp_path / 'run'}", "algorithm.mode=grpo", "train.steps=2", *TINY]) == 0
    for i, e in enumerate(events):
        if e == "generate" and "sleep" in events[:i]:
            last_sleep = max(j for j in range(i) if events[j] == "sleep")
            assert any(x.startswith("load") for x in events[last_sleep:i]), events
