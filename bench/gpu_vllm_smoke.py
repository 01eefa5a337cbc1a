"""vLLM smoke stage of bench/gpu_check.sh (< 3 minutes): the first things a GPU user's RED run does with vLLM.

    python -m bench.gpu_vllm_smoke [--out DIR] [--eager] [--dry-run]

On a small random Qwen2 (head_dim 64, RoPE base 40000, tied head; no download), with the engine the trainer uses
(red.rollout.vllm_engine.VLLMEngine: bf16, fp32 head, sleep level 2 on CUDA):
  1. engine start; vLLM's rotary cache follows `rope_parameters` (base 40000, not the default 10000);
  2. greedy and seeded sampled generation (log-probs returned, seeded sampling reproducible);
  3. weight update from an fp32 trainer: exact bit-checksum check and log-prob probe; a sync that writes nothing
     must fail the exact check;
  4. CUDA only: sleep (level 2) releases memory, generate refuses discarded weights, load + wake restore the
     memory and the same greedy tokens as before the sleep (bytes reported);
  5. sampled-token log-prob mismatch vLLM vs red_kernels.linear_logprobs on the same tokens (reported).
Without vLLM it prints SKIPPED and exits 0; --dry-run builds the model and checks imports without an engine.
Results: DIR/gpu_vllm_smoke.json (DIR = --out, $OUT or bench/results). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROPE_THETA = 40000.0
MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=ROPE_THETA,
    initializer_range=0.1,
)
QUESTIONS = ["3 + 4 = ?", "12 * 2", "sort 5 3 9", "what is 7 - 2?"]
MAX_PROMPT, MAX_NEW = 64, 32


class Smoke:
    def __init__(self):
        self.report, self.failed = {"checks": {}}, []

    def check(self, name: str, ok: bool, **values) -> None:
        self.report["checks"][name] = {"ok": bool(ok), **values}
        print(f"[vllm smoke] {'ok  ' if ok else 'FAIL'} {name} {values}", flush=True)
        if not ok:
            self.failed.append(name)


def build(tmp: str):
    import torch

    from red import synthetic

    tok = synthetic.build_tokenizer()
    model = synthetic.build_model(tok, MODEL, seed=0).float()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    ps = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in QUESTIONS
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tok, ps


def perturb(model, seed: int) -> None:
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * p.std() * torch.randn(p.shape, generator=g)).to(p.device))


def rotary_error(engine, head_dim: int) -> dict:
    """Max |vLLM cos/sin cache − cos/sin at base 40000| and at base 10000 over positions 0..255."""
    import torch

    def first_cache(module):
        for m in module.modules():
            c = getattr(m, "cos_sin_cache", None)
            if isinstance(c, torch.Tensor):
                return c[:256].float().cpu().clone()
        return None

    cache = engine.llm.apply_model(first_cache)[0]
    if cache is None:
        return {"found": False}
    out = {"found": True}
    pos = torch.arange(cache.shape[0], dtype=torch.float64)[:, None]
    for base in (ROPE_THETA, 10000.0):
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        want = torch.cat([torch.cos(pos * inv), torch.sin(pos * inv)], dim=1)
        out[f"max_err_base_{int(base)}"] = float((cache.double() - want).abs().max())
    return out


def run(smoke: Smoke, args) -> None:
    import shutil

    tmp = tempfile.mkdtemp(prefix="red-vllm-smoke-")
    try:
        _run(smoke, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(smoke: Smoke, args, tmp: str) -> None:
    import torch

    from red.rollout import SamplingConfig
    from red.rollout.mismatch import logprob_mismatch
    from red.rollout.vllm_engine import _DEFAULT_SYNC_ATOL, VLLMEngine
    from red.rollout.vllm_sync import check_vllm_version
    from red.rollout.weight_sync import verify_weight_sync
    from red_kernels import linear_logprobs

    model, tok, ps = build(tmp)
    cuda = torch.cuda.is_available()
    smoke.report.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
    if args.dry_run:
        smoke.check(
            "dry_run_model_built",
            len(ps) == len(QUESTIONS),
            params=sum(p.numel() for p in model.parameters()),
            vllm_installed=importlib.util.find_spec("vllm") is not None,
        )
        return
    with warnings.catch_warnings(record=True) as caught:  # report a release outside the checked range, and
        warnings.simplefilter("always")  # still run the other checks on it
        smoke.report["vllm"] = check_vllm_version()
    outside = [str(w.message) for w in caught if "outside" in str(w.message)]
    if outside:
        smoke.check("vllm_version_in_supported_range", False, error=outside[0][:200])
    t = time.perf_counter()
    engine = VLLMEngine(
        tmp,
        max_prompt_len=MAX_PROMPT,
        max_new_tokens=MAX_NEW,
        seed=0,
        dtype="bfloat16",
        gpu_memory_utilization=0.2,
        llm_kwargs={"enforce_eager": True} if args.eager else None,
    )
    smoke.check(
        "engine_start",
        engine.weights_valid and engine.dtype == torch.bfloat16,
        seconds=round(time.perf_counter() - t, 1),
        sleep_level=engine.sleep_level,
        head_dtype=str(engine.llm.llm_engine.model_config.head_dtype),
    )
    head_dim = MODEL["hidden_size"] // MODEL["num_attention_heads"]
    rot = rotary_error(engine, head_dim)
    smoke.check(
        "rotary_base_40000",
        rot.get("found") and rot["max_err_base_40000"] < 1e-2 < rot["max_err_base_10000"],
        **rot,
    )

    greedy = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    sampled = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
    engine.load_weights(model.named_parameters())
    g0 = [r[0].token_ids for r in engine.generate(ps, 1, greedy)]
    s1, s2 = engine.generate(ps, 4, sampled), engine.generate(ps, 4, sampled)
    lps = [lp for g in s1 for r in g for lp in r.logprobs]
    smoke.check(
        "generate",
        all(len(x) > 0 for x in g0)
        and all(math.isfinite(v) for v in lps)
        and [[r.token_ids for r in g] for g in s1] == [[r.token_ids for r in g] for g in s2],
        greedy_lengths=[len(x) for x in g0],
        sampled_tokens=len(lps),
    )

    perturb(model, 1)
    probe = ps[0] + g0[0]
    stale = verify_weight_sync(engine, model, probe, atol=_DEFAULT_SYNC_ATOL["bfloat16"])
    engine.load_weights(model.named_parameters())
    synced = verify_weight_sync(engine, model, probe, atol=_DEFAULT_SYNC_ATOL["bfloat16"])
    smoke.check(
        "weight_update_exact_and_probe",
        synced.ok and bool(engine.last_exact_check),
        sync_seconds=round(engine.last_sync_seconds, 4),
        exact_checked=sorted(engine.last_exact_check),
        probe_max_abs_diff=synced.max_abs_diff,
        probe_mean_abs_diff=synced.mean_abs_diff,
        stale_probe_max_abs_diff=stale.max_abs_diff,
        atol=synced.atol,
    )

    perturb(model, 2)
    real_rpc = engine.llm.collective_rpc

    def dropping_rpc(method, *a, kwargs=None, **kw):
        if method == "reload_weights":
            for _ in kwargs["weights_iterator"]:
                pass
            return [None]
        return real_rpc(method, *a, kwargs=kwargs, **kw)

    engine.llm.collective_rpc, caught = dropping_rpc, None
    try:
        engine.load_weights(model.named_parameters())
    except RuntimeError as e:
        caught = str(e)
    finally:
        engine.llm.collective_rpc = real_rpc
    smoke.check(
        "noop_sync_fails_exact_check",
        caught is not None and "did not take effect" in caught,
        error=(caught or "")[:160],
    )
    engine.load_weights(model.named_parameters())

    if cuda and engine.sleep_mode:
        before = [r[0].token_ids for r in engine.generate(ps, 1, greedy)]
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        engine.sleep()
        free1 = torch.cuda.mem_get_info()[0]
        refused = False
        try:
            engine.generate(ps, 1, greedy)
        except RuntimeError:
            refused = True
        engine.load_weights(model.named_parameters())
        after = [r[0].token_ids for r in engine.generate(ps, 1, greedy)]
        free2 = torch.cuda.mem_get_info()[0]
        released, restored = free1 - free0, free1 - free2
        smoke.check(
            "sleep_level2_release_restore",
            released > 0 and refused and after == before and abs(restored - released) <= 0.1 * released,
            released_bytes=released,
            restored_bytes=restored,
            generate_refused_while_invalid=refused,
            same_greedy_tokens=after == before,
        )
    else:
        smoke.check("sleep_level2_release_restore", True, skipped="no CUDA sleep mode on this machine")

    rollouts = [r for g in engine.generate(ps, 4, sampled) for r in g]
    head = model.get_output_embeddings().weight
    eng, tr = [], []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.token_ids], device=head.device)
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(r.prompt_ids) - 1 : -1]
            lp, _ = linear_logprobs(hidden, head, ids[0, len(r.prompt_ids) :], temperature=1.0)
            eng.append(torch.tensor(r.logprobs))
            tr.append(lp.float().cpu())
    T = max(len(e) for e in eng)
    pad = lambda xs: torch.stack([torch.nn.functional.pad(x, (0, T - len(x))) for x in xs])  # noqa: E731
    mask = pad([torch.ones(len(e)) for e in eng]).bool()
    mm = logprob_mismatch(pad(eng), pad(tr), mask, cap=2.0)
    vals = {k: round(v, 5) for k, v in mm.metrics("").items()}
    smoke.check(
        "logprob_mismatch_vs_red_kernels",
        all(math.isfinite(v) for v in vals.values())
        and vals["max_abs_diff"] < _DEFAULT_SYNC_ATOL["bfloat16"],
        tokens=int(mask.sum()),
        **vals,
    )
    engine.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--dry-run", action="store_true", help="imports and model only, no engine")
    args = ap.parse_args(argv)
    smoke = Smoke()
    if importlib.util.find_spec("vllm") is None and not args.dry_run:
        print("[vllm smoke] SKIPPED: vLLM is not installed here (pip install 'red-kernels[vllm]')")
        smoke.report["skipped"] = "vllm not installed"
    else:
        t = time.perf_counter()
        try:
            run(smoke, args)
        except Exception as e:  # a crash is a failed stage, reported like the checks
            smoke.check("crashed", False, error=f"{type(e).__name__}: {e}"[:500])
        smoke.report["seconds"] = round(time.perf_counter() - t, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_vllm_smoke.json"), "w") as f:
        json.dump(smoke.report, f, indent=1)
    print(f"[vllm smoke] {'FAILED: ' + ', '.join(smoke.failed) if smoke.failed else 'passed'}")
    return 1 if smoke.failed else 0


if __name__ == "__main__":
    sys.exit(main())
