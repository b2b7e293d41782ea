"""The ``generate`` path of trie-constrained decoding: transformers' beam search and sampling with the trie processor.

:func:`~trl_flower.evaluation.recommend.recommend` uses it with ``decoder="generate"`` (the reference its trie
decoder is tested against) and :func:`~trl_flower.evaluation.recommend.sample_items` always. What is here: a complete
explicit generation config with the model's shipped defaults hidden during the call, the shared prompt KV cache
(each prompt encoded once, ``logits_to_keep=1``), a sparse recorder of beam scores, and one batch of beam search.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from trl_flower.decoding import LogProbTemperatureProcessor, TrieLogitsProcessor, generated_nodes
from trl_flower.prompt_sharing import prompt_forward
from trl_flower.tree import PrefixTree


class ScoreRecorder(LogitsProcessor):
    """Records the allowed entries of each step's final scores (sparse) to rebuild beam scores afterwards.

    ``generate`` returns beam scores only with ``output_scores=True``, which keeps a dense [rows, V] copy per step
    (about 100 MB per step for 160 beams × a 152k vocabulary). The scores that matter are the few allowed entries,
    which the trie processor just listed (``last_allowed``), so we keep only those: sorted flat keys
    ``row * V + token`` and their values. Place it right after `trie`.
    """

    def __init__(self, trie: TrieLogitsProcessor) -> None:
        self.trie = trie
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.vocab_size = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self.vocab_size = scores.shape[1]
        rows, tokens = self.trie.last_allowed  # [E], [E]
        keys, order = torch.sort(rows * self.vocab_size + tokens)  # [E]
        self.steps.append((keys, scores[rows, tokens][order]))
        return scores

    def sequence_scores(
        self, generated: torch.Tensor, beam_indices: torch.Tensor, length_penalty: float
    ) -> torch.Tensor:
        """Σ_s score_s[beam_indices[:, s], generated[:, s]] / n ** length_penalty, n = number of generated tokens.

        Args:
            generated: [N, L] generated tokens of the returned sequences.
            beam_indices: [N, L] the flat beam row that produced each token at each step (-1 after the end).
        """
        total = torch.zeros(generated.shape[0], dtype=torch.float64, device=generated.device)  # [N]
        for s in range(generated.shape[1]):  # one lookup per decoding step
            rows = beam_indices[:, s].long()  # [N]
            keys, values = self.steps[s]
            query = rows.clamp(min=0) * self.vocab_size + generated[:, s]  # [N]
            pos = torch.searchsorted(keys, query).clamp(max=max(keys.numel() - 1, 0))  # [N]
            total += torch.where(rows >= 0, values[pos].double(), torch.zeros_like(total))
        n = (beam_indices >= 0).sum(1).clamp(min=1).double()  # [N]
        return (total / n**length_penalty).float()


@contextmanager
def own_generation_defaults(model) -> Iterator[None]:
    """Hide the model's ``generation_config`` during a ``generate`` call.

    ``generate`` fills every field of the passed config that is None from ``model.generation_config`` (transformers
    ≥ 4.50, "defaults_only" merge). Many fields (``min_new_tokens``, ``bad_words_ids``, ``suppress_tokens``,
    ``min_p``, ``max_time``, ``stop_strings``, ...) have no neutral non-None value, so a config built from scratch
    cannot shut them out; swapping in an empty config for the duration of the call does.
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


def generation_config(
    tree: PrefixTree, pad_id: int, max_new_tokens: int, do_sample: bool, **kwargs
) -> GenerationConfig:
    """A complete generation config: the caller's settings and neutral values for every other knob.

    Fields left None would be filled from transformers' global defaults (``top_k=50``!), so the sampling knobs are
    set explicitly when sampling; without sampling they are unused and left out (setting them only draws a
    warning). Used together with :func:`own_generation_defaults`.
    """
    config = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
        do_sample=do_sample,
        early_stopping=False,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=tree.terminator_id,  # a sequence ends when it emits the terminator
        bos_token_id=None,
        return_dict_in_generate=True,
        output_scores=False,
    )
    if do_sample:
        config.update(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    config.update(kwargs)
    return GenerationConfig(**config)


def beam_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int):
    """The KV cache of every prompt without its last token, encoded once per prompt and copied to its beams.

    ``generate`` copies each prompt ``num_beams`` times before its first forward, so beam search encodes every
    prompt ``num_beams`` times; when prompts are much longer than item titles that prefill is most of the work.
    Handed this cache, ``generate`` runs only the uncached last prompt token. Positions follow the attention mask
    as in ``generate`` (left padding), so the result is the same as without the cache.

    Args:
        input_ids, attention_mask: [B, P] left-padded prompts, P ≥ 2.

    Returns:
        a transformers ``Cache`` over [B * num_beams] rows (prompt b's copies next to each other, as ``generate``
        orders beams), or None for a model that returns no copyable cache (``generate`` then encodes the prompts
        itself: the same lists, only slower).
    """
    cache = prompt_cache(model, input_ids, attention_mask)
    if cache is not None:
        cache.batch_repeat_interleave(num_beams)
    return cache


def prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The KV cache of [B, P] left-padded prompts without their last token (positions from the attention mask,
    as ``generate`` computes them), or None for a model that returns no cache that can be copied across rows.

    The prompt pass is `trl_flower.prompt_sharing.prompt_forward` (``logits_to_keep=1``: only the cache is used;
    full-vocabulary logits of every prompt position would cost about 5 GB for 64 prompts of 130 tokens at a 152k
    vocabulary)."""
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [B, P]
    _, cache = prompt_forward(model, input_ids[:, :-1], attention_mask[:, :-1], position_ids=position_ids[:, :-1])
    if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
        return None
    return cache


def sampling_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: np.ndarray):
    """The prompt cache of a sampling batch whose rows repeat prompts: each distinct prompt is encoded once and its
    cache copied to the rows that draw from it (`rows`: [B] prompt index of each row). None when no prompt repeats
    (nothing to save) or the model returns no copyable cache; ``generate`` then encodes the rows itself."""
    _, first, row_to_distinct = np.unique(rows, return_index=True, return_inverse=True)
    if first.size == rows.size:
        return None
    first = torch.as_tensor(first, device=input_ids.device)
    cache = prompt_cache(model, input_ids[first], attention_mask[first])  # same P: the same prompts, padded alike
    if cache is not None:
        cache.batch_select_indices(torch.as_tensor(row_to_distinct, device=input_ids.device))
    return cache


def beam_search_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    *,
    num_beams: int,
    top_k: int,
    max_new_tokens: int,
    length_penalty: float,
    temperature: float,
    pad_id: int,
    share_prompt_cache: bool,
    item_probs: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of left-padded prompts [B, P] through ``generate`` with the trie processor (and D3's guidance
    processor when `item_probs` [B, num_items] are given): the top_k nodes and scores of each prompt, [B*top_k]."""
    config = generation_config(
        tree,
        pad_id,
        max_new_tokens,
        False,
        num_beams=num_beams,
        num_return_sequences=top_k,
        length_penalty=length_penalty,
    )
    P = input_ids.shape[1]
    trie = TrieLogitsProcessor(tree, prompt_length=P)
    recorder = ScoreRecorder(trie)
    processors = [trie]
    if item_probs is not None:
        from trl_flower.baselines.d3 import D3GuidanceProcessor

        processors.append(D3GuidanceProcessor(tree, item_probs, guidance_scale, prompt_length=P))
    processors.append(recorder)  # last: beam scores include temperature and guidance
    if temperature != 1.0:
        processors.insert(0, LogProbTemperatureProcessor(temperature))
    shared = None  # None: generate encodes the prompts itself
    if share_prompt_cache and P > 1:
        shared = beam_prompt_cache(model, input_ids, attention_mask, num_beams)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
        past_key_values=shared,
    )
    generated = out.sequences[:, P:]  # [B*K, L]
    batch_nodes, off_at = generated_nodes(tree, generated)  # [B*K]
    if bool((off_at >= 0).any()):
        raise RuntimeError("beam search produced a sequence outside the item tree (a bug: please report)")
    return batch_nodes, recorder.sequence_scores(generated, out.beam_indices, length_penalty)
