"""RolloutEngine on Hugging Face `generate` (CPU and GPU). Colocated: it samples from the trainer's own module.

Sampled-token log-probs are recorded during generation by a logits processor that sees the raw logits before
any warper, so they are log softmax(z / temperature) of the full distribution (the quantity the trainer
computes), without keeping [steps, batch, vocab] scores around.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .base import Rollout, SamplingConfig


class _RecordLogprobs:
    """LogitsProcessor: at step t stores log softmax(scores / tau) and, at step t+1, gathers the log-prob of
    the token sampled at step t (the last input id). `finish()` gathers the last step."""

    def __init__(self, tau: float):
        self.tau = tau if tau > 0 else 1.0
        self.prev = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.tau, dim=-1)
        return scores

    def finish(self, last_tokens):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
            self.prev = None
        return torch.stack(self.out, 1) if self.out else None


class HFEngine:
    """RolloutEngine (red/rollout/base.py): generate() with left padding in chunks of about `batch_size`
    sequences, each prompt's prefill run once for its n members;
    stop at any of `stop_token_ids`. `colocated`: it samples from the trainer's own module, so a weight sync has
    nothing to copy and its weights are always valid; sleep, wake and close have nothing to do."""

    colocated = True
    weights_valid = True

    def __init__(
        self,
        model,
        tokenizer,
        stop_token_ids: list[int] | None = None,
        batch_size: int = 256,
        return_logprobs: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs
        ids = set(stop_token_ids or [])
        for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(src)
        if not ids:
            raise ValueError("HFEngine needs at least one stop token (tokenizer.eos_token_id is None)")
        self.stop_ids = sorted(ids)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """n rollouts of each prompt. Prompts are taken in chunks of about `batch_size` sequences; each chunk's
        prompts run their prefill once and the key/value cache is repeated for the n members (HF generate would
        run it n times: at a group of 8, 7/8 of the prefill)."""
        if n <= 0:  # every member of the group is a teacher trace (rollout.num_offline = rollout.n)
            return [[] for _ in prompt_ids]
        per_chunk = max(self.batch_size // n, 1)
        results: list[list[Rollout]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(prompt_ids), per_chunk):
                    flat = self._generate_chunk(prompt_ids[start : start + per_chunk], n, sampling)
                    results.extend(flat[i * n : (i + 1) * n] for i in range(len(flat) // n))
        finally:
            self.model.train(was_training)
        return results

    def _prefill(self, ids, mask, n):
        """The key/value cache of every prompt's tokens but its last ([g, W-1], left-padded), run once per prompt
        and repeated n times along the batch (generate then runs the last prompt token and samples)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pos = (mask[:, :-1].cumsum(1) - 1).clamp(min=0)
        self.model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        if n > 1:
            cache.batch_repeat_interleave(n)
        return cache

    def _generate_chunk(self, prompts, n, sampling):
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = self._prefill(ids, mask, n) if width > 1 else None
        greedy = sampling.temperature == 0
        gen_cfg = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids,
            bos_token_id=None,
        )
        rec = _RecordLogprobs(sampling.temperature) if self.return_logprobs else None
        out = self.model.generate(
            input_ids=ids.repeat_interleave(n, 0),
            attention_mask=mask.repeat_interleave(n, 0),
            past_key_values=cache,
            generation_config=gen_cfg,
            logits_processor=LogitsProcessorList([rec]) if rec else None,
        )
        new = out[:, width:].cpu()
        lps = rec.finish(out[:, -1]).cpu() if rec else None
        stop = torch.tensor(self.stop_ids)
        rollouts = []
        for i, p in enumerate(q for q in prompts for _ in range(n)):
            row = new[i].tolist()
            is_stop = torch.isin(new[i], stop).nonzero()
            if len(is_stop):
                end, reason = int(is_stop[0]) + 1, "stop"
            else:
                end, reason = len(row), "length"
            rollouts.append(
                Rollout(
                    prompt_ids=list(p),
                    token_ids=row[:end],
                    logprobs=None if lps is None else lps[i, :end].tolist(),
                    finish_reason=reason,
                )
            )
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Colocated engine: it already samples from the trainer's module; tensors of another model are copied."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named_tensors:
                if name in params and params[name].data_ptr() != t.data_ptr():
                    params[name].copy_(t)

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids) − 1] float32: temperature-1 log-prob of token t given tokens < t (one forward)."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([token_ids], device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        finally:
            self.model.train(was_training)
        return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).cpu()

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
