"""The training side's one prompt-cache helper: run each prompt once and continue several sequences on its KV cache.

Flower's step scores two continuations of every prompt: the SFT target and the sampled title. Prompts (history of
ten titles) are much longer than titles, so running the prompt once and continuing both on its KV cache roughly
halves the forward cost. The gradient flows back into the prompt through the cache. The in-loss sampler extends a
detached copy of the same cache (:func:`detached_cache`, `trl_flower.sampling`).

Entry points: :func:`shared_prompt_logits` (prompt once when possible, else the stacked rows), or the pieces
:func:`prompt_forward`, :func:`repeated_prompt_forward`, :func:`detached_cache`, :func:`continue_on_cache`,
:func:`stacked_continuation_logits`. No TRL import.

:func:`prompt_forward` is the one prompt pass with a cache (``logits_to_keep=1``): the trainer, evaluation's
``generate`` path (`trl_flower.evaluation.generate_path.prompt_cache`, which passes position ids from the mask as
``generate`` does) and RQ1's sampler (:func:`repeated_prompt_forward`) all run it. The trie beam search
(`trl_flower.evaluation.trie_beam_search`) runs the decoder without its head in its prefill (it scores the allowed
children from hidden states), so that pass is its own.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch

Continuation = tuple[torch.Tensor, torch.Tensor]  # ids and mask [B, n], right-padded


def pad_columns(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad [B, n] to [B, width] with `value`."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def stack_continuations(continuations: Sequence[Continuation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Ids and masks of k continuations stacked to [B, k, n] (n = the longest), and n."""
    n = max(ids.shape[1] for ids, _ in continuations)
    cont_ids = torch.stack([pad_columns(ids, n, pad_id) for ids, _ in continuations], dim=1)
    cont_mask = torch.stack([pad_columns(m.long(), n, 0) for _, m in continuations], dim=1)
    return cont_ids, cont_mask, n


def detached_cache(cache):
    """A copy of a transformers `DynamicCache` whose layers hold detached views of its keys/values (no data copy).

    Sampling extends the copy (each layer's update concatenates into new tensors), so the gradient cache is never
    modified and the sampler's forwards build no graph.
    """
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in clone.layers:
        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    return clone


def prompt_forward(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
):
    """The prompts [B, P] once (with gradient unless the caller disables it): (logits [B, 1, V] at the end of the
    prompt, KV cache).

    Only the last position's logits are computed (``logits_to_keep=1``): the others are never read, and at a 152k
    vocabulary they would cost [B, P, V] floats. `position_ids` [B, P] (e.g. from the mask of left-padded prompts, as
    ``generate`` computes them) are passed to the model when given; else the model numbers the positions itself.

    Returns (None, None) when the model gives no usable cache (e.g. under gradient checkpointing).
    """
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1, **kwargs)
    cache = getattr(out, "past_key_values", None)
    if not hasattr(cache, "get_seq_length") or cache.get_seq_length() != prompt_ids.shape[1]:
        return None, None  # no cache, a legacy tuple, or one that dropped positions
    return out.logits[:, -1:], cache


def repeated_prompt_forward(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int):
    """The prompts [B, P] once (:func:`prompt_forward`), their state repeated for `repeats` rows each.

    For drawing several continuations of each prompt (RQ1 samples many titles from one prompt): row b·repeats + r
    continues prompt b. The cache is repeated in place.

    Returns:
        (logits [B·repeats, 1, V] at the end of the prompt, KV cache over B·repeats rows, mask [B·repeats, P]), or
        (None, None, None) when the model gives no usable cache.
    """
    first, cache = prompt_forward(model, prompt_ids, prompt_mask)
    if cache is None:
        return None, None, None
    cache.batch_repeat_interleave(repeats)
    return first.repeat_interleave(repeats, dim=0), cache, prompt_mask.repeat_interleave(repeats, dim=0)


def continue_on_cache(
    model: torch.nn.Module,
    first_logits: torch.Tensor,
    cache,
    prompt_mask: torch.Tensor,
    continuations: Sequence[Continuation],
    pad_id: int,
) -> list[torch.Tensor]:
    """All continuations in one forward on the prompts' cache (repeated in place); logits [B, n_i + 1, V] each.

    Entry i holds the logits at the states s_0 … s_{n_i}, s_0 being the end of the prompt (`first_logits`).
    """
    k = len(continuations)
    cont_ids, cont_mask, n = stack_continuations(continuations, pad_id)  # [B, k, n]
    B = prompt_mask.shape[0]
    cache.batch_repeat_interleave(k)  # [B*k, ...] row b*k + i = prompt b, continuation i
    attention = torch.cat([prompt_mask.repeat_interleave(k, dim=0), cont_mask.reshape(B * k, n)], dim=1)
    rest = model(
        input_ids=cont_ids.reshape(B * k, n), attention_mask=attention, past_key_values=cache, use_cache=True
    ).logits  # [B*k, n, V] states s_1 … s_n
    rest = rest.reshape(B, k, n, -1)
    logits = torch.cat([first_logits.unsqueeze(1).expand(B, k, 1, -1), rest], dim=2)  # [B, k, n+1, V]
    return [logits[:, i, : c_ids.shape[1] + 1] for i, (c_ids, _) in enumerate(continuations)]


def stacked_continuation_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    continuations: Sequence[Continuation],
    pad_id: int,
) -> list[torch.Tensor]:
    """The same logits as `continue_on_cache`, with each row [prompt + continuation_i] run in full (no cache)."""
    k = len(continuations)
    cont_ids, cont_mask, n = stack_continuations(continuations, pad_id)  # [B, k, n]
    B = prompt_ids.shape[0]
    rows = torch.cat([prompt_ids.repeat_interleave(k, dim=0), cont_ids.reshape(B * k, n)], dim=1)  # [B*k, P+n]
    attention = torch.cat([prompt_mask.repeat_interleave(k, dim=0), cont_mask.reshape(B * k, n)], dim=1)
    logits = model(input_ids=rows, attention_mask=attention, logits_to_keep=n + 1).logits  # [B*k, n+1, V]
    logits = logits.reshape(B, k, n + 1, -1)
    return [logits[:, i, : c_ids.shape[1] + 1] for i, (c_ids, _) in enumerate(continuations)]


def shared_prompt_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    continuations: Sequence[Continuation],
    pad_id: int,
    share_prompt: bool = True,
) -> list[torch.Tensor]:
    """Logits at the states after the prompts for several continuations of them, with gradient.

    Continuation i (ids and mask [B, n_i], right-padded) yields logits [B, n_i + 1, V] at the states
    s_0 … s_{n_i} (s_0 = end of the prompt). With two or more continuations and `share_prompt`, the prompts [B, P]
    run once and their KV cache is repeated for the continuations (:func:`continue_on_cache`); with one
    continuation, `share_prompt=False` (gradient checkpointing drops caches) or a model without a usable cache, the
    rows [prompt + continuation_i] run stacked (:func:`stacked_continuation_logits`). Both give the same logits.
    """
    if len(continuations) > 1 and share_prompt:
        first, cache = prompt_forward(model, prompt_ids, prompt_mask)
        if cache is not None:
            return continue_on_cache(model, first, cache, prompt_mask, continuations, pad_id)
        warnings.warn("the model returned no usable KV cache; using the stacked forward instead", stacklevel=2)
    return stacked_continuation_logits(model, prompt_ids, prompt_mask, continuations, pad_id)
