"""Tokens/s of the old-policy pass and the update (red/update.py), packed vs padded micro-batches (issue 14).

Cases (the same model runs both layouts on the same sequences; tokens/s counts real tokens, padding excluded):
* embedded: the embedded default (red/configs/default.yaml: tiny Qwen2, H 128, 2 layers, budget 8192), 32
  prompts of the real task x (7 online + 1 real teacher trace); online lengths uniform in [trace/2, 48], 20 %
  truncated at rollout.max_new_tokens = 48.
* longtail: the same model, 16 prompts (16..256 tokens) x 8 responses with log-normal lengths (median 100,
  sigma 1, clipped to [4, 2048]) — the long-tailed mix of RL batches; budget 8192.
CPU: `pytest bench/test_bench_packing.py --benchmark-only [--record]` (one thread; wall and process CPU time,
medians of 2 rounds after 1 warm-up); --record writes bench/results/packing-cpu.json/.md.
GPU: `python -m bench.test_bench_packing --device cuda --out DIR` (needs torch, transformers, red_kernels only;
longtail case, bf16 autocast, a Qwen2 of H 1024 x 8 layers, V 32,000, budget 16,384; every packed attention
available — flash_attention_2, torch_varlen — against padded sdpa, exit 1 if log-probs disagree by > 0.1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS, WARMUP = 2, 1


def _batch(case: str, V: int, seed: int = 0):
    from red.records import PromptItem, RolloutBatch
    from red.rollout.base import Rollout

    g = torch.Generator().manual_seed(seed)
    if case == "embedded":
        from red import synthetic
        from red.config import load_config
        from red.models import trace_eos_id
        from red.train import load_items

        cfg = load_config(overrides=["data.synthetic_train_size=256"])
        tok = synthetic.build_tokenizer()
        items = load_items(cfg, tok, trace_eos_id(tok, None), cfg.data.train, need_traces=True)[0][:32]
        mx = cfg.rollout.max_new_tokens
        rollouts = []
        for it in items:
            lo = max(len(it.trace_ids[0]) // 2, 1)
            n = [
                mx
                if float(torch.rand(1, generator=g)) < 0.2
                else int(torch.randint(lo, mx + 1, (1,), generator=g))
                for _ in range(7)
            ]
            rollouts.append(
                [
                    Rollout(it.prompt_ids, torch.randint(3, V, (k,), generator=g).tolist(), None, "stop")
                    for k in n
                ]
            )
        return RolloutBatch.from_rollouts(items, rollouts, 1)
    items, rollouts = [], []
    for i in range(16):
        p = torch.randint(3, V, (int(torch.randint(16, 257, (1,), generator=g)),), generator=g).tolist()
        n = (
            (torch.randn(8, generator=g) + torch.log(torch.tensor(100.0)))
            .exp()
            .clamp(4, 2048)
            .long()
            .tolist()
        )
        items.append(PromptItem(p, "1", [], "t", i, i))
        rollouts.append(
            [Rollout(p, torch.randint(3, V, (k,), generator=g).tolist(), None, "stop") for k in n]
        )
    return RolloutBatch.from_rollouts(items, rollouts, 0)


def _with_targets(batch):
    g = torch.Generator().manual_seed(1)
    return batch.replace(
        advantage=torch.randn(batch.B, generator=g),
        group_accuracy=torch.full((batch.B,), 0.5),
        offline_weight=torch.ones(batch.B),
    )


def _time(fn):
    walls, cpus = [], []
    for r in range(WARMUP + ROUNDS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if r >= WARMUP:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def measure(model, pad_id, batch, budget, layout, dtype="float32"):
    """{old_pass, update}: wall s, CPU s and real tokens/s of one pass over the whole batch (the RED loss of the
    embedded default: seq_sum_const with C = 48, clip 0.2/0.28, RED shaping)."""
    from red.update import Policy, old_policy_pass, policy_update
    from red_kernels import REDLossConfig

    policy = Policy(model, dtype, pad_id=pad_id)
    policy.packing = layout
    loss_cfg = REDLossConfig(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        offline_shaping="accuracy_shift",
        loss_agg="seq_sum_const",
        loss_const=48.0,
        r_min=1 / 16,
    )
    tokens = int(batch.lengths.sum())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step itself is not what is compared
    from red.packing import micro_batches

    mbs = micro_batches(batch, budget, pad_id, layout)
    out = {
        "micro_batches": len(mbs),
        "slots": sum(mb.input_ids.numel() for mb in mbs),
    }  # tokens incl. padding
    b = {}
    out["old_pass"] = _time(lambda: b.__setitem__("b", old_policy_pass(policy, batch, budget, 1.0)))
    old = b["b"]
    out["update"] = _time(lambda: policy_update(policy, old, loss_cfg, budget, opt, 1.0, old.B))
    for k in ("old_pass", "update"):
        wall, cpu = out[k]
        out[k] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu,
        }
    out["logprobs"] = old.old_logprobs
    return out


EMBEDDED_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # red/configs/default.yaml model.tiny
BUDGET = 8192  # red/configs/default.yaml train.micro_batch_tokens


def _model(kw: dict, vocab: int, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab, tie_word_embeddings=True, pad_token_id=0, attn_implementation="sdpa", **kw
        )
    ).to(device)


def run(
    device="cpu",
    attn_impls=("sdpa",),
    model_kw=None,
    dtype="float32",
    vocab=None,
    budget=BUDGET,
    cases=("embedded", "longtail"),
) -> dict:
    """Padded sdpa and each packed attention in attn_impls, on every case (see the module docstring)."""
    from red import attention
    from red.batching import token_budget_groups

    if vocab is None:
        from red import synthetic

        vocab = len(synthetic.build_tokenizer())  # the embedded tokenizer (token ids of the real task)
    model = _model(model_kw or EMBEDDED_MODEL, vocab, device)
    res = {
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "budget": budget,
        "vocab": vocab,
        "model": {
            k: getattr(model.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        },
        "cases": {},
    }
    pad_id = 0
    for case in cases:
        batch = _with_targets(_batch(case, vocab))
        lens = batch.lengths.tolist()
        padded_tokens = sum(len(grp) * max(lens[i] for i in grp) for grp in token_budget_groups(lens, budget))
        row = {"sequences": batch.B, "tokens": sum(lens), "padded_tokens": padded_tokens, "runs": {}}
        model.config._attn_implementation = "sdpa"
        ref = measure(model, pad_id, batch, budget, "off", dtype)
        row["runs"]["padded sdpa"] = ref
        for impl in attn_impls:
            model.config._attn_implementation = attention.resolve(impl, device, dtype)
            layout = attention.packing_layout(model.config._attn_implementation, device)
            got = measure(model, pad_id, batch, budget, layout, dtype)
            got["max_abs_logprob_diff"] = float((got["logprobs"] - ref["logprobs"]).abs().max())
            got["ratio_old_pass"] = got["old_pass"]["tokens_per_s"] / ref["old_pass"]["tokens_per_s"]
            got["ratio_update"] = got["update"]["tokens_per_s"] / ref["update"]["tokens_per_s"]
            got["ratio_old_pass_cpu"] = (
                got["old_pass"]["tokens_per_cpu_s"] / ref["old_pass"]["tokens_per_cpu_s"]
            )
            got["ratio_update_cpu"] = got["update"]["tokens_per_cpu_s"] / ref["update"]["tokens_per_cpu_s"]
            row["runs"][f"packed {impl} ({layout})"] = got
        for r in row["runs"].values():
            r.pop("logprobs")
        res["cases"][case] = row
    model.config._attn_implementation = "sdpa"
    return res


def markdown(res: dict) -> str:
    lines = [
        f"# packed vs padded micro-batches — {res['device']}, {res['dtype']}, {res['threads']} thread(s), "
        f"budget {res['budget']}, model {res['model']}",
        "",
        "| case | run | micro-batches (token slots) | old pass tok/s (CPU-time tok/s) | "
        "update tok/s (CPU-time tok/s) | "
        "packed/padded old pass | packed/padded update |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, row in res["cases"].items():
        for name, r in row["runs"].items():

            def f(k, r=r):
                return f"{r[k]['tokens_per_s']:.0f} ({r[k]['tokens_per_cpu_s']:.0f})"

            def ratio(k, r=r):
                return f"{r[k]:.2f}x (CPU {r[k + '_cpu']:.2f}x)" if k in r else "1"

            lines.append(
                f"| {case}: {row['sequences']} seqs, {row['tokens']} tokens ({row['padded_tokens']} "
                f"padded) | {name} | {r['micro_batches']} ({r['slots']}) | {f('old_pass')} | {f('update')} | "
                f"{ratio('ratio_old_pass')} | {ratio('ratio_update')} |"
            )
    meta = ", ".join(f"{k} {res[k]}" for k in ("recorded_utc", "commit", "note") if res.get(k))
    return "\n".join(lines + ([f"\n{meta}"] if meta else [])) + "\n"


def write(res: dict, out: Path, name: str):
    import subprocess

    res["recorded_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    res["commit"] = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or None
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(markdown(res))


def test_bench_packing_cpu(benchmark, request):
    torch.set_num_threads(1)
    holder = {}
    benchmark.group = "trainer passes: packed vs padded"
    benchmark.pedantic(lambda: holder.__setitem__("r", run("cpu")), rounds=1, iterations=1)
    res = holder["r"]
    res["note"] = request.config.getoption("record_note")
    benchmark.extra_info.update(
        {c: {k: v.get("ratio_update") for k, v in row["runs"].items()} for c, row in res["cases"].items()}
    )
    print("\n" + markdown(res))
    for row in res["cases"].values():
        for r in row["runs"].values():
            assert r.get("max_abs_logprob_diff", 0.0) < 1e-4
    if request.config.getoption("record"):
        write(res, RESULTS, "packing-cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description="packed vs padded trainer passes on GPU (see module docstring)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    from red import attention

    impls = (["flash_attention_2"] if attention.has_flash_attn() else []) + (
        [attention.VARLEN] if attention._varlen_fn() is not None else []
    )
    if not impls:
        print(
            "no packed attention on this machine (neither flash-attn nor torch varlen_attn): nothing to check"
        )
        return 0
    res = run(
        a.device,
        impls,
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
        },
        "bfloat16",
        vocab=32000,
        budget=16384,
        cases=("longtail",),
    )
    write(res, Path(a.out), "packing-gpu")
    print(markdown(res))
    worst = max(
        r.get("max_abs_logprob_diff", 0.0) for row in res["cases"].values() for r in row["runs"].values()
    )
    print(f"max |log p packed - log p padded| (bf16): {worst:.3g}")
    return 0 if worst < 0.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
