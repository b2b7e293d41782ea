r"""Trie beam search: ``generate``'s beam search over the item prefix tree, without [rows × vocabulary] tensors.

:func:`trie_beam_search` returns, for a batch of left-padded prompts, the same top-K items and beam scores as
``model.generate(num_beams=K, num_return_sequences=N, early_stopping=False, ...)`` with
:class:`~trl_flower.decoding.TrieLogitsProcessor` (the ``decoder="generate"`` path of
:func:`~trl_flower.evaluation.recommend.recommend`), at a fraction of the cost for large vocabularies. One step:

1. one forward of the decoder for all live beams on the KV cache (the prompt itself once per prompt, not per beam);
2. the allowed (beam, token) pairs from the tree's compact child arrays (:func:`~trl_flower.decoding.allowed_edges`);
3. their log-probabilities: the allowed logits minus one normaliser per row from a chunked running log-sum-exp of
   the output projection (:func:`~trl_flower.evaluation.output_head.log_normalizer`), or, with
   ``policy_support="tree"``, renormalised over the allowed children only (no vocabulary pass at all);
4. optional D3 guidance on those scores (:func:`~trl_flower.baselines.d3.guided_edge_scores`);
5. ``generate``'s beam bookkeeping, transcribed as tensor operations on the candidates only: top 2K candidates per
   prompt, the K best that did not end become the running beams, those among the top K that ended (terminator, or
   the length budget) enter the finished set with score Σ log p / n ** length_penalty, and transformers'
   early-stop heuristic decides when a prompt is done;
6. the KV cache reordered by index (``Cache.reorder_cache``); prompts that are done leave the batch.

Exactness (the argument in full is in docs/decoding.md): every score ``generate`` ranks is −inf except at allowed
tokens, and −inf candidates never become running or finished beams while at least K finite candidates exist, which
the tree guarantees. So ranking the finite candidates with the same float32 arithmetic, the same −1e9 offsets and
the same tie order (the lower flat index ``beam * V + token`` first, i.e. a stable sort of candidates enumerated
beam by beam, token by token) reproduces ``generate``'s choices. Scores differ from ``generate``'s by float
rounding only (the normaliser is summed in another order, about 1e-6), the same size as ``generate``'s own change
between batch sizes. A prompt leaves the batch once transformers' heuristic says its finished set can no longer
change (and it holds K real hypotheses), so its lists do not depend on the other prompts of the batch.

Ties: torch's CPU ``topk`` (which ``generate`` uses) promises no order among exactly equal scores; its heap returns
them in an order that depends on where they sit in the [K·V] row. This engine always puts the lower flat index
first (a stable sort). Exactly tied hypotheses can therefore be listed in another order than ``generate``'s, with
the same scores (tests/test_trie_beam_search.py, ``TestTies``, shows both: the rule, and generate's other order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trl_flower.baselines.d3 import guided_edge_scores
from trl_flower.decoding import allowed_edges
from trl_flower.evaluation.output_head import CHUNK_ELEMENTS, ModelParts, edge_logits, log_normalizer
from trl_flower.tree import PrefixTree

NEG = -1.0e9  # generate's score offset for beams that must not be chosen (a float32 constant there too)
RETIRE_BELOW = -1.0e8  # a finished score below this is a placeholder or a −1e9-offset beam: the prompt stays
POLICY_SUPPORTS = ("vocabulary", "tree")

__all__ = ["BeamSearchOutput", "Guidance", "POLICY_SUPPORTS", "trie_beam_search"]


@dataclass(frozen=True)
class Guidance:
    """D3 guidance for one batch: SASRec mass below every tree node per prompt, and the scale g.

    Attributes:
        node_mass: [B, num_nodes] float64 (``tree.aggregate_to_nodes`` of each prompt's SASRec probabilities).
        scale: g of ``g · (score − cf) + cf`` (see :mod:`trl_flower.baselines.d3`).
    """

    node_mass: torch.Tensor
    scale: float


@dataclass
class BeamSearchOutput:
    """Finished hypotheses of each prompt, best first.

    Attributes:
        nodes: int64 [B, N]: the tree node each hypothesis ended on: terminal for an item, an inner node when the
            length budget cut it, -1 for a slot no hypothesis filled (possible only with tiny catalogues).
        scores: float32 [B, N]: Σ log-probs (after temperature and guidance) / (generated tokens) ** length_penalty.
    """

    nodes: torch.Tensor
    scores: torch.Tensor


@dataclass
class _Beams:
    """Search state of the A prompts still in the batch ([A, K] unless noted)."""

    prompt: torch.Tensor  # [A] index of each prompt in the batch
    row: torch.Tensor  # [A, K] row of `hidden` / the cache that holds each running beam's state
    node: torch.Tensor  # [A, K] tree node of each running beam
    score: torch.Tensor  # [A, K] float32 running score Σ log p (−1e9 offsets included, as in generate)
    done_score: torch.Tensor  # [A, K] float32 finished scores (length-normalised), best first
    done_node: torch.Tensor  # [A, K] node of each finished hypothesis (-1: empty slot)
    done: torch.Tensor  # [A, K] bool: slot holds a finished hypothesis
    open: torch.Tensor  # [A] bool: transformers' "improvement still possible" flag
    token: torch.Tensor  # [A, K] last token of each running beam (the next forward's input)


@torch.no_grad()
def trie_beam_search(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    *,
    parts: ModelParts,
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    policy_support: str = "vocabulary",
    guidance: Guidance | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> BeamSearchOutput:
    """Trie-constrained beam search of a batch of prompts (see the module docstring).

    Args:
        input_ids, attention_mask: [B, P] left-padded prompts.
        tree: the item prefix tree; a hypothesis ends when it emits ``tree.terminator_id``.
        parts: the model's decoder and linear head (:func:`~trl_flower.evaluation.output_head.split_model`).
        num_beams: K running beams per prompt.
        num_return_sequences: N ≤ K hypotheses returned per prompt.
        max_new_tokens: length budget; hypotheses still open then are returned on their inner node.
        length_penalty: finished score = Σ log p / n ** length_penalty (n counts the terminator).
        temperature: per-step log-probs are log_softmax(log p / T), as ``LogProbTemperatureProcessor``.
        policy_support: ``"vocabulary"`` (log-probs over the whole vocabulary: identical to ``generate``) or
            ``"tree"`` (the policy renormalised over each node's children, as ``flow_policy_support="tree"``
            trains it; no normaliser pass).
        guidance: D3 guidance of this batch, or None.
        chunk_elements: floats in the largest [rows × vocabulary chunk] block.

    Returns:
        :class:`BeamSearchOutput` with [B, N] nodes and scores.
    """
    if policy_support not in POLICY_SUPPORTS:
        raise ValueError(f"`policy_support` must be one of {POLICY_SUPPORTS}, got {policy_support!r}")
    B, K, device = input_ids.shape[0], num_beams, input_ids.device
    out_nodes = torch.full((B, K), -1, dtype=torch.long, device=device)  # [B, K]
    out_scores = torch.full((B, K), NEG, dtype=torch.float32, device=device)  # [B, K]
    step_log_probs = _step_scorer(parts, policy_support, temperature, chunk_elements)

    # prompt pass: every prompt once (generate would run each K times); positions follow the mask as in generate
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [B, P]
    prefill = parts.decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
    )
    cache = prefill.past_key_values
    hidden = prefill.last_hidden_state[:, -1]  # [B, H]: one row per prompt, shared by its K beams
    del prefill
    mask, next_position = attention_mask, attention_mask.sum(-1)  # [R, L], [R]
    beams = _initial_beams(B, K, device)

    for step in range(max_new_tokens):
        row_node = _row_nodes(beams, hidden.shape[0])  # [R]
        rows, tokens, children = allowed_edges(tree, row_node, tree.terminator_id)  # [E] each
        logp = step_log_probs(hidden, rows, tokens)  # [E] float32
        if guidance is not None:
            row_prompt = _row_prompts(beams, hidden.shape[0])  # [R] batch prompt of each row
            logp = guided_edge_scores(
                logp, rows, children, tree.tensors(device).is_terminal[row_node], row_prompt, guidance
            )
        last = step + 1 >= max_new_tokens
        source = _advance(
            beams, rows, tokens, children, logp, hidden.shape[0], tree.terminator_id, step + 1, last, length_penalty
        )
        if last:
            break
        retired = ~beams.open & beams.done.all(1) & (beams.done_score > RETIRE_BELOW).all(1)  # [A]
        _store(out_nodes, out_scores, beams, retired)
        if bool(retired.all()):
            beams = None
            break
        if bool(retired.any()):
            keep = ~retired
            source = source[keep]
            beams = _select(beams, keep)
        # next forward: the chosen beams' tokens on their source rows' cache
        index = source.reshape(-1)  # [R'] row each new beam continues
        cache.reorder_cache(index)
        mask = torch.cat([mask[index], torch.ones_like(mask[index, :1])], dim=1)  # [R', L + 1]
        positions = next_position[index]  # [R']
        next_position = positions + 1
        tokens_in = beams.token.reshape(-1, 1)  # [R', 1]
        hidden = parts.decoder(
            input_ids=tokens_in,
            attention_mask=mask,
            position_ids=positions.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]  # [R', H]
        A = beams.prompt.shape[0]
        beams.row = torch.arange(A * K, device=device).view(A, K)  # beams now own their rows
    if beams is not None:
        _store(out_nodes, out_scores, beams, torch.ones_like(beams.prompt, dtype=torch.bool))
    N = num_return_sequences
    return BeamSearchOutput(nodes=out_nodes[:, :N], scores=out_scores[:, :N])


def _step_scorer(
    parts: ModelParts, policy_support: str, temperature: float, chunk_elements: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-step log-probability of allowed (row, token) pairs [E] given hidden states [R, H]."""

    def vocabulary(hidden, rows, tokens):
        # log_softmax(log_softmax(z) / T) = z/T − log Σ_v exp(z_v / T): one normaliser per row
        normaliser, logits = log_normalizer(hidden, parts, rows, tokens, temperature, chunk_elements)
        return logits - normaliser[rows]  # [E]

    def tree(hidden, rows, tokens):
        logits = edge_logits(hidden, parts, rows, tokens, chunk_elements)  # [E]
        if temperature != 1.0:
            logits = logits / temperature
        return logits - _segment_logsumexp(logits, rows, hidden.shape[0])[rows]  # [E]

    return vocabulary if policy_support == "vocabulary" else tree


def _segment_logsumexp(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log Σ exp(values) within each segment id (rows of a flat edge list); [num_segments]."""
    top = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)  # [R]
    top = top.scatter_reduce(0, segments, values, reduce="amax")
    total = torch.zeros_like(top).index_add_(0, segments, torch.exp(values - top[segments]))  # [R]
    return top + torch.log(total)


def _initial_beams(B: int, K: int, device) -> _Beams:
    """generate's start: K copies of each prompt, beam 0 at score 0 and the others at −1e9 (so the first step
    takes distinct tokens from beam 0), an empty finished set at −1e9, every prompt open."""
    score = torch.zeros(B, K, dtype=torch.float32, device=device)  # [B, K]
    score[:, 1:] = NEG
    beams = _Beams(
        prompt=torch.arange(B, device=device),
        row=torch.arange(B, device=device).unsqueeze(1).expand(B, K).contiguous(),  # all beams on the prompt row
        node=torch.zeros(B, K, dtype=torch.long, device=device),  # the root
        score=score,
        done_score=torch.full((B, K), NEG, dtype=torch.float32, device=device),
        done_node=torch.full((B, K), -1, dtype=torch.long, device=device),
        done=torch.zeros(B, K, dtype=torch.bool, device=device),
        open=torch.ones(B, dtype=torch.bool, device=device),
        token=torch.zeros(B, K, dtype=torch.long, device=device),
    )
    return beams


def _row_nodes(beams: _Beams, num_rows: int) -> torch.Tensor:
    """Tree node of each computed row [R] (a row is shared by all beams that point at it)."""
    node = torch.zeros(num_rows, dtype=torch.long, device=beams.node.device)  # [R]
    node[beams.row.reshape(-1)] = beams.node.reshape(-1)
    return node


def _row_prompts(beams: _Beams, num_rows: int) -> torch.Tensor:
    """Batch prompt index of each computed row [R]."""
    prompt = torch.zeros(num_rows, dtype=torch.long, device=beams.node.device)  # [R]
    prompt[beams.row.reshape(-1)] = beams.prompt.unsqueeze(1).expand_as(beams.row).reshape(-1)
    return prompt


def _advance(
    beams: _Beams,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    children: torch.Tensor,
    logp: torch.Tensor,
    num_rows: int,
    terminator: int,
    length: int,
    last: bool,
    length_penalty: float,
) -> torch.Tensor:
    """One step of generate's beam bookkeeping on the candidates; updates `beams` in place.

    Args:
        rows, tokens, children, logp: [E] allowed edges of the computed rows (sorted by row, then token) and their
            step log-probs.
        num_rows: R, rows computed this step.
        length: generated tokens after this step (n of the length penalty).
        last: this step exhausts the length budget (every candidate "ends").

    Returns:
        [A, K] the computed row each new running beam continues from (for the cache reorder).
    """
    A, K = beams.row.shape
    device = rows.device
    # candidates: every running beam × its row's allowed edges, enumerated beam by beam, token by token: the
    # order of generate's flat index beam * V + token, which a stable sort keeps among equal scores
    per_row = torch.bincount(rows, minlength=num_rows)  # [R] edges per row
    first_edge = torch.cumsum(per_row, 0) - per_row  # [R]
    beam_rows = beams.row.reshape(-1)  # [A*K]
    count = per_row[beam_rows]  # [A*K] candidates of each beam
    C = int(count.sum())
    beam_of = torch.repeat_interleave(torch.arange(A * K, device=device), count, output_size=C)  # [C]
    start = torch.cumsum(count, 0) - count  # [A*K]
    edge_of = first_edge[beam_rows][beam_of] + torch.arange(C, device=device) - start[beam_of]  # [C]
    cand_score = logp[edge_of] + beams.score.reshape(-1)[beam_of]  # [C] float32, as generate adds them
    per_prompt = count.view(A, K).sum(1)  # [A]
    prompt_of = beam_of // K  # [C]
    slot = torch.arange(C, device=device) - (torch.cumsum(per_prompt, 0) - per_prompt)[prompt_of]  # [C]
    width = max(int(per_prompt.max()), 2 * K)
    padded = torch.full((A, width), float("-inf"), dtype=torch.float32, device=device)  # [A, W]
    padded[prompt_of, slot] = cand_score
    cand_id = torch.full((A, width), -1, dtype=torch.long, device=device)  # [A, W]
    cand_id[prompt_of, slot] = torch.arange(C, device=device)

    # c. top 2K candidates per prompt (generate: topk over [K·V]; ties: lower flat index first)
    top_score, order = torch.sort(padded, dim=1, descending=True, stable=True)
    top_score, top_id = top_score[:, : 2 * K], torch.gather(cand_id, 1, order[:, : 2 * K])  # [A, 2K]
    real = top_id >= 0  # [A, 2K] (fewer than 2K candidates: −inf fillers, which can never be chosen)
    safe = top_id.clamp(min=0)
    top_beam = beam_of[safe]  # [A, 2K] flat running beam
    top_token = torch.where(real, tokens[edge_of[safe]], -1)  # [A, 2K]
    top_node = torch.where(real, children[edge_of[safe]], -1)  # [A, 2K]
    top_row = beam_rows[top_beam]  # [A, 2K] computed row the candidate extends
    # d. which candidates end: the terminator, or the length budget (generate's MaxLengthCriteria)
    ends = (top_token == terminator) | torch.full_like(real, last)  # [A, 2K]

    # e. running beams: the K best, ended candidates pushed down by 1e9 (generate's arithmetic, float32)
    run_score = top_score + ends.to(torch.float32) * NEG  # [A, 2K]
    run_score, pick = torch.sort(run_score, dim=1, descending=True, stable=True)
    pick = pick[:, :K]  # [A, K]
    source = torch.gather(top_row, 1, pick)  # [A, K]

    # f. finished set: ended candidates among the top K, scored Σ log p / n ** lp, merged with the old set
    ended_top = ends & (torch.arange(2 * K, device=device) < K)  # [A, 2K]
    new_done = top_score / (length**length_penalty)
    new_done = new_done + (~beams.open).unsqueeze(1).to(torch.float32) * NEG  # closed prompts take no more
    new_done = new_done + (~ended_top) * NEG  # open candidates cannot be finished
    merged_score = torch.cat([beams.done_score, new_done], dim=1)  # [A, 3K]
    merged_node = torch.cat([beams.done_node, top_node], dim=1)  # [A, 3K]
    merged_done = torch.cat([beams.done, ended_top], dim=1)  # [A, 3K]
    beams.done_score, best = torch.sort(merged_score, dim=1, descending=True, stable=True)
    best = best[:, :K]  # [A, K]
    beams.done_score = beams.done_score[:, :K]
    beams.done_node = torch.gather(merged_node, 1, best)
    beams.done = torch.gather(merged_done, 1, best)

    beams.score = run_score[:, :K]
    beams.node = torch.gather(top_node, 1, pick)
    beams.token = torch.gather(top_token, 1, pick)

    # g. transformers' early-stop heuristic (early_stopping=False): can the best running beam, at its current
    # length, still beat the worst finished one? Once not, the prompt's finished set is final.
    best_running = beams.score[:, :1] / (length**length_penalty)  # [A, 1]
    worst_done = torch.where(beams.done, beams.done_score.min(dim=1, keepdim=True).values, NEG)  # [A, K]
    beams.open = beams.open & (best_running > worst_done).any(dim=1)
    return source


def _select(beams: _Beams, keep: torch.Tensor) -> _Beams:
    """The state of the prompts in `keep` [A] only."""
    return _Beams(**{name: getattr(beams, name)[keep] for name in _Beams.__dataclass_fields__})


def _store(nodes: torch.Tensor, scores: torch.Tensor, beams: _Beams, which: torch.Tensor) -> None:
    """Write the finished sets of the prompts in `which` [A] into the batch outputs [B, K]."""
    prompt = beams.prompt[which]
    nodes[prompt] = torch.where(beams.done[which], beams.done_node[which], -1)
    scores[prompt] = beams.done_score[which]
