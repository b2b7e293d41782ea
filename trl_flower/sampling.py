"""Trie-constrained ancestral sampling of item titles on a prompt's KV cache (no TRL import).

`FlowerTrainer` samples its on-policy items inside the loss step: the prompt runs once with gradient, and the
sampler extends a *detached* copy of that prompt's cache (`trl_flower.prompt_sharing.detached_cache`) token by
token. These functions hold that sampling; the trainer only wires them to its config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.prompt_sharing import detached_cache  # noqa: F401  (re-exported: the sampler's cache copy)

LogitsWarper = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_warpers(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> list[LogitsWarper]:
    """transformers' logits warpers for the given sampling settings (applied after the trie mask, as in generate).

    A setting that does nothing (temperature 1, top_k 0/None, top_p None/1, min_p 0/None) adds no warper.
    """
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[LogitsWarper] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


@torch.no_grad()
def sample_on_cache(
    model: torch.nn.Module,
    first_logits: torch.Tensor,
    cache,
    prompt_mask: torch.Tensor,
    uniforms: torch.Tensor,
    trie: TrieLogitsProcessor,
    eos_ids: Sequence[int],
    pad_id: int,
    warpers: Sequence[LogitsWarper] = (),
) -> torch.Tensor:
    """Sample one path per prompt through the trie, continuing `cache` in place; completion ids [B, T].

    `first_logits` [B, 1, V]: the logits at the end of the prompt; `cache`: the prompt's KV cache (pass a
    `detached_cache` copy; it is extended); `prompt_mask` [B, P]; `uniforms` [B, T_max]: one U(0, 1) per prompt and
    step, turned into a token by inverse CDF over the trie-masked, warped distribution. Drawing the randomness up
    front makes a row's sample independent of the batch it is in (the same sample under any data-parallel split).
    Rows stop at an EOS id; a completion keeps its EOS and is padded with `pad_id` after it, the form GRPO's
    `generate` path returns.
    """
    B = prompt_mask.shape[0]
    device = prompt_mask.device
    eos = torch.tensor(list(eos_ids), device=device)
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # [B, t] generated so far
    done = torch.zeros(B, dtype=torch.bool, device=device)
    attention = prompt_mask
    logits = first_logits[:, -1].float()  # [B, V]
    for step in range(uniforms.shape[1]):
        scores = trie(tokens, logits)
        for warp in warpers:
            scores = warp(tokens, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)  # [B, V]
        u = uniforms[:, step : step + 1].to(cdf.dtype) * cdf[:, -1:]  # [B, 1]
        nxt = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # [B]
        nxt = torch.where(done, pad_id, nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        logits = (
            model(
                input_ids=nxt[:, None],
                attention_mask=attention,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
    return tokens
