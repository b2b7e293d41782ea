"""Top-K recommendation by batched, trie-constrained beam search, and constrained sampling of items.

:func:`recommend` is the evaluation decoder of the Flower reference (flower_reference.md §3.1): beam search with
``num_beams = num_return_sequences = K``, only catalogue titles allowed, length penalty 1 (D3: 0), optional decoding
temperature (the "Temp" baseline). Unlike the reference it decodes many prompts per batch (left padding and an
attention mask) and maps every result to its item through the prefix tree, without decoding or string matching.
Its default decoder is the trie beam search of :mod:`trl_flower.evaluation.trie_beam_search`, which never builds a
[rows × vocabulary] tensor; ``decoder="generate"`` runs transformers' ``generate`` with the trie processor, with the
same lists (tested). :func:`sample_items` draws items by constrained sampling (distribution fitting, RQ1), and
:func:`export_official_json` writes the official evaluation JSON that the authors' ``calc.py`` reads.

Results do not depend on the batch size: a prompt's top-K list is the same alone or in a batch of 16 (tested). The
model's own ``generation_config`` (e.g. a shipped ``generation_config.json`` with sampling, top-k, repetition
penalty or a max length) never leaks into these calls: the trie decoder never reads it, and every ``generate`` call
sets all knobs explicitly (see :mod:`trl_flower.evaluation.generate_path`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessorList

from trl_flower.decoding import TrieLogitsProcessor, generated_nodes
from trl_flower.evaluation import generate_path
from trl_flower.evaluation.output_head import ModelParts, split_matches_model, split_model
from trl_flower.evaluation.trie_beam_search import POLICY_SUPPORTS, Guidance, trie_beam_search
from trl_flower.tree import PrefixTree

DECODERS = ("trie", "generate")


@dataclass
class Recommendations:
    """Top-K lists of U prompts (users), rank 0 first.

    Attributes:
        item_ids: int64 [U, K]: the representative (smallest) item id of each recommended title
            (``tree.terminal_item``); -1 if a beam did not complete a title within ``max_new_tokens``.
        nodes: int64 [U, K]: the terminal tree node of each recommendation (-1 likewise). Duplicate titles share a
            node; :meth:`all_item_ids` lists every item id of one recommendation.
        scores: float32 [U, K]: beam scores, Σ log-probs of the generated tokens (terminator included, after the
            temperature) divided by (number of generated tokens) ** length_penalty; sorted descending per row.
        titles: [U][K] titles (``titles[item_id]``; "" for -1) when item titles were given, else None.
        tree: the prefix tree the items come from.
    """

    item_ids: np.ndarray
    nodes: np.ndarray
    scores: np.ndarray
    titles: list[list[str]] | None
    tree: PrefixTree = field(repr=False, compare=False)

    def all_item_ids(self, user: int, rank: int) -> np.ndarray:
        """All item ids that share the title recommended to `user` at `rank` (one id unless titles repeat)."""
        node = int(self.nodes[user, rank])
        return self.tree.items_of_node(node) if node >= 0 else np.empty(0, dtype=np.int64)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: input_ids and attention_mask [B, P]."""
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(rows), P), dtype=torch.long)  # [B, P]
    for i, r in enumerate(rows):  # B Python lists, once per batch (not per step)
        if r:
            ids[i, P - len(r) :] = torch.tensor(r)
            mask[i, P - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _tokenize(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("`prompts` must be a list of strings (rendered prompts, one per user)")
    if len(prompts) == 0:
        raise ValueError("`prompts` is empty")
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    empty = [i for i, r in enumerate(ids) if len(r) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} tokenises to zero tokens; every prompt needs at least one token")
    return ids


def _pad_id(tokenizer, tree: PrefixTree) -> int:
    """The tokenizer's pad token, else the terminator (the Flower reference pads with EOS)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return tree.terminator_id if pad is None else int(pad)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable, total: int, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def recommend(
    model,
    tokenizer,
    prompts: Sequence[str],
    tree: PrefixTree,
    top_k: int = 10,
    num_beams: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    titles: Sequence[str] | None = None,
    add_special_tokens: bool = True,
    show_progress: bool = True,
    share_prompt_cache: bool = True,
    decoder: str = "trie",
    policy_support: str = "vocabulary",
    guidance: tuple[torch.Tensor, float] | None = None,
) -> Recommendations:
    """Top-K items per prompt by trie-constrained beam search, many prompts per batch.

    Prompts are tokenised once, sorted by length (less padding), split into batches of `batch_size`, left-padded
    with an attention mask, and decoded with ``num_beams`` beams, keeping the best `top_k` finished titles.
    Rows come back in the order of `prompts`; the lists do not depend on `batch_size`.

    Two decoders give the same lists (tested): ``"trie"`` (default), the trie beam search of
    :mod:`trl_flower.evaluation.trie_beam_search`, which never builds a [rows × vocabulary] tensor, and
    ``"generate"``, transformers' ``generate`` with :class:`~trl_flower.decoding.TrieLogitsProcessor` (each
    returned sequence mapped to its node by :func:`~trl_flower.decoding.generated_nodes`). A model whose logits are
    not ``lm_head(decoder(x))`` (soft-capping, a LoRA-wrapped head; checked once on the first prompt) is decoded
    with ``generate`` and a warning.

    Args:
        model: a causal LM (PEFT models work).
        tokenizer: its tokenizer; prompts are tokenised with it, pad = its pad token (else the terminator).
        prompts: U rendered prompts (chat template already applied), one per user.
        tree: the evaluation prefix tree (all catalogue items, over this tokenizer).
        top_k: K, recommendations per prompt (≤ number of distinct titles).
        num_beams: beams per prompt, ≥ top_k (default: top_k, as in the reference).
        batch_size: prompts per decoding batch (rows = batch_size × num_beams).
        max_new_tokens: decoding budget (default: the longest item path, so every beam can finish).
        length_penalty: exponent of the length normalisation of finished beams (1.0 reference, 0.0 D3).
        temperature: decoding temperature: per-step log-probs become log_softmax(log p / T) before the trie mask
            (the "Temp" baseline; transformers applies no temperature in beam search).
        titles: item titles indexed by item id (optional) to fill :attr:`Recommendations.titles`.
        add_special_tokens: passed to the tokenizer (False if `prompts` already contain BOS).
        show_progress: show a tqdm bar over batches.
        share_prompt_cache: ``decoder="generate"`` only: encode each prompt once and copy its KV cache to its
            beams (:func:`~trl_flower.evaluation.generate_path.beam_prompt_cache`) instead of letting ``generate``
            encode it ``num_beams`` times; same lists, less time. False forces plain ``generate`` (to compare). The
            trie decoder always encodes each prompt once.
        decoder: ``"trie"`` (default) or ``"generate"`` (see above).
        policy_support: ``"vocabulary"`` (default): per-step log-probs over the whole vocabulary, the paper's
            scoring. ``"tree"`` (trie decoder only): the policy renormalised over each node's children (as
            ``FlowerConfig(flow_policy_support="tree")`` trains it); no vocabulary-wide pass, other lists (see
            docs/decoding.md).
        guidance: guided decoding by an auxiliary recommender, as D3 does (normally set by
            :func:`~trl_flower.baselines.d3.recommend_d3`): per-prompt item probabilities [U, num_items] and the
            scale g of ``g · (score − cf) + cf``. None: no guidance.

    Returns:
        :class:`Recommendations` with [U, K] item ids, nodes and scores.

    Raises:
        ValueError: for invalid arguments (each message names the argument and the fix).
    """
    num_terminals = int(tree.is_terminal.sum()) if isinstance(tree, PrefixTree) else 0
    num_beams = top_k if num_beams is None else num_beams
    if not isinstance(top_k, int) or not 1 <= top_k <= num_terminals:
        raise ValueError(
            f"`top_k` must be an int in [1, {num_terminals}] (the number of distinct titles), got {top_k!r}"
        )
    if not isinstance(num_beams, int) or num_beams < top_k:
        raise ValueError(f"`num_beams` must be an int >= top_k={top_k}, got {num_beams!r}")
    if decoder not in DECODERS:
        raise ValueError(f"`decoder` must be one of {DECODERS}, got {decoder!r}")
    if policy_support not in POLICY_SUPPORTS:
        raise ValueError(f"`policy_support` must be one of {POLICY_SUPPORTS}, got {policy_support!r}")
    if policy_support != "vocabulary" and decoder != "trie":
        raise ValueError(
            f"`policy_support={policy_support!r}` needs decoder='trie'; generate scores over the whole vocabulary"
        )
    _check_common(tree, batch_size, max_new_tokens, temperature, titles)
    max_new_tokens = int(tree.item_length.max()) if max_new_tokens is None else max_new_tokens
    token_ids = _tokenize(tokenizer, prompts, add_special_tokens)
    pad_id, device = _pad_id(tokenizer, tree), _device(model)

    U = len(token_ids)
    order = np.argsort([-len(r) for r in token_ids], kind="stable")  # longest first: memory peaks at once
    nodes = np.full((U, top_k), -1, dtype=np.int64)
    scores = np.zeros((U, top_k), dtype=np.float32)
    parts = None  # None: the generate path
    if decoder == "trie":
        parts = _checked_parts(model, torch.tensor([token_ids[order[0]]], device=device))
        if parts is None and policy_support == "tree":
            raise ValueError("policy_support='tree' needs a model whose logits are lm_head(decoder(x)); see warning")
    common = dict(
        num_beams=num_beams,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        length_penalty=float(length_penalty),
        temperature=float(temperature),
    )
    g = 1.0 if guidance is None else float(guidance[1])
    starts = range(0, U, batch_size)
    with torch.no_grad(), generate_path.own_generation_defaults(model):
        for start in _progress(starts, len(starts), show_progress, "recommend"):
            rows = order[start : start + batch_size]  # [B] prompt indices
            input_ids, attention_mask = _left_pad([token_ids[i] for i in rows], pad_id, device)
            probs = None if guidance is None else torch.as_tensor(guidance[0])[torch.as_tensor(rows)]  # [B, M]
            if parts is not None:
                batch_nodes, batch_scores = _trie_batch(
                    input_ids, attention_mask, tree, parts, policy_support, probs, g, **common
                )
            else:
                batch_nodes, batch_scores = generate_path.beam_search_batch(
                    model,
                    input_ids,
                    attention_mask,
                    tree,
                    pad_id=pad_id,
                    share_prompt_cache=share_prompt_cache,
                    item_probs=probs,
                    guidance_scale=g,
                    **common,
                )
            nodes[rows] = batch_nodes.view(len(rows), top_k).cpu().numpy()
            scores[rows] = batch_scores.view(len(rows), top_k).cpu().numpy()

    is_terminal = np.zeros(nodes.shape, dtype=bool)
    is_terminal[nodes >= 0] = tree.is_terminal[nodes[nodes >= 0]]
    nodes = np.where(is_terminal, nodes, -1)  # an unfinished beam has no item
    item_ids = tree.terminal_item(torch.as_tensor(nodes)).numpy()
    return Recommendations(item_ids=item_ids, nodes=nodes, scores=scores, titles=_titles(item_ids, titles), tree=tree)


def _checked_parts(model, first_prompt: torch.Tensor) -> ModelParts | None:
    """The model's decoder and head for the trie decoder, or None (with a warning) if its logits are not
    ``lm_head(decoder(x))``, checked on the first prompt [1, P]."""
    parts = split_model(model)
    with torch.no_grad():
        ok = parts is not None and split_matches_model(model, parts, first_prompt, torch.ones_like(first_prompt))
    if not ok:
        warnings.warn(
            f"recommend(decoder='trie'): the logits of {type(model).__name__} are not lm_head(decoder(x)) "
            "(no plain linear head, or soft-capped/scaled logits); decoding with generate instead (same lists, "
            "slower). Pass decoder='generate' to silence this.",
            stacklevel=3,
        )
        return None
    return parts


def _trie_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    parts: ModelParts,
    policy_support: str,
    probs: torch.Tensor | None,
    guidance_scale: float,
    *,
    num_beams: int,
    top_k: int,
    max_new_tokens: int,
    length_penalty: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through the trie beam search: nodes and scores [B, top_k]."""
    guidance = None
    if probs is not None and guidance_scale != 1.0:
        guidance = Guidance(node_mass=tree.aggregate_to_nodes(probs.double()), scale=guidance_scale)
    out = trie_beam_search(
        input_ids,
        attention_mask,
        tree,
        parts=parts,
        num_beams=num_beams,
        num_return_sequences=top_k,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        temperature=temperature,
        policy_support=policy_support,
        guidance=guidance,
    )
    return out.nodes, out.scores


def sample_items(
    model,
    tokenizer,
    prompts: Sequence[str],
    tree: PrefixTree,
    num_samples: int = 1,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    max_new_tokens: int | None = None,
    positive_flow_only: bool = False,
    add_special_tokens: bool = True,
    show_progress: bool = True,
    share_prompt_cache: bool = True,
) -> np.ndarray:
    """Draw items by trie-constrained ancestral sampling (distribution fitting, flower_reference.md §3.3).

    Every (prompt, sample) pair is one row; rows are decoded `batch_size` at a time with pure sampling
    (``do_sample=True``, top-k and top-p off), the trie mask applied before the temperature. With one
    history-free prompt and many samples this estimates the model's item distribution.

    Args:
        prompts: U rendered prompts (repeat one prompt for an unconditional distribution).
        num_samples: S samples per prompt.
        temperature: sampling temperature T (the distribution is softmax((logits + mask) / T)).
        batch_size: rows (sequences) per ``generate`` call.
        seed: seeds torch's RNG inside a forked RNG state (the caller's RNG is untouched). Draws are
            reproducible for a fixed seed and `batch_size`.
        max_new_tokens: default the longest item path.
        positive_flow_only: forbid items with zero flow (reward 0) in the tree.
        share_prompt_cache: encode each distinct prompt of a batch once and copy its KV cache to the rows that
            sample from it, instead of letting ``generate`` encode every row (with one prompt and many samples the
            prompt is most of the work). The draws are the same for a seed, up to float32 rounding of the logits.

    Returns:
        int64 [U, S] representative item ids (``tree.terminal_item``; -1 only if `max_new_tokens` cut a title).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an int >= 1, got {num_samples!r}")
    _check_common(tree, batch_size, max_new_tokens, temperature, None)
    max_new_tokens = int(tree.item_length.max()) if max_new_tokens is None else max_new_tokens
    token_ids = _tokenize(tokenizer, prompts, add_special_tokens)
    pad_id, device = _pad_id(tokenizer, tree), _device(model)
    config = generate_path.generation_config(tree, pad_id, max_new_tokens, True, temperature=float(temperature))

    U = len(token_ids)
    row_prompt = np.repeat(np.arange(U), num_samples)  # [U*S] prompt of each row, samples of a prompt adjacent
    items = np.full(U * num_samples, -1, dtype=np.int64)
    starts = range(0, row_prompt.size, batch_size)
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), generate_path.own_generation_defaults(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in _progress(starts, len(starts), show_progress, "sample"):
            rows = row_prompt[start : start + batch_size]
            input_ids, attention_mask = _left_pad([token_ids[i] for i in rows], pad_id, device)
            P = input_ids.shape[1]
            processor = TrieLogitsProcessor(tree, prompt_length=P, positive_flow_only=positive_flow_only)
            shared = None  # None: generate encodes the rows itself
            if share_prompt_cache and P > 1:
                shared = generate_path.sampling_prompt_cache(model, input_ids, attention_mask, rows)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([processor]),
                past_key_values=shared,
            )
            nodes, _ = generated_nodes(tree, out.sequences[:, P:])
            items[start : start + rows.size] = tree.terminal_item(nodes).cpu().numpy()
    return items.reshape(U, num_samples)


def _check_common(tree, batch_size, max_new_tokens, temperature, titles) -> None:
    if not isinstance(tree, PrefixTree):
        raise ValueError(f"`tree` must be a trl_flower PrefixTree, got {type(tree).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"`max_new_tokens` must be an int >= 1 or None (longest item path), got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a float > 0, got {temperature!r}")
    if titles is not None and len(titles) != tree.num_items:
        raise ValueError(f"`titles` must have one title per item ({tree.num_items}), got {len(titles)}")


def _titles(item_ids: np.ndarray, titles: Sequence[str] | None) -> list[list[str]] | None:
    if titles is None:
        return None
    return [[titles[i] if i >= 0 else "" for i in row] for row in item_ids.tolist()]


def export_official_json(
    recs: Recommendations, targets: Sequence[str], path: str | Path, prompts: Sequence[str] | None = None
) -> None:
    """Write recommendations in the official evaluation JSON form, readable by the authors' ``calc.py``.

    One object per test row, in order: ``{"predict": [K titles, rank 0 first], "output": target title,
    "predict_score": [K beam scores]}`` plus ``"input": prompt`` when `prompts` are given. ``calc.py`` reads only
    ``predict`` (each title stripped of ``": \\n"``, spaces and ``"``) and ``output`` (stripped of ``" \\n"``; the
    official files store ``title + "\\n"``, which strips to the same title). An unfinished beam is written as ""
    (``calc.py`` counts it in CC, the invalid-title count).

    Args:
        recs: recommendations made with ``titles`` (so :attr:`Recommendations.titles` is set).
        targets: U target titles.
        path: output file.
        prompts: optional U prompts, stored as ``input``.
    """
    if recs.titles is None:
        raise ValueError("recommendations have no titles: call recommend(..., titles=item_titles)")
    if len(targets) != len(recs.titles) or (prompts is not None and len(prompts) != len(recs.titles)):
        raise ValueError(f"need one target (and prompt) per row: {len(recs.titles)} rows, {len(targets)} targets")
    rows = []
    for u, (predict, target) in enumerate(zip(recs.titles, targets)):
        row = {"input": prompts[u]} if prompts is not None else {}
        row.update(predict=list(predict), output=str(target), predict_score=[float(s) for s in recs.scores[u]])
        rows.append(row)
    Path(path).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
