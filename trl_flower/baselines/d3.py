r"""D3 decoding (Bao et al., "Decoding Matters: Addressing Amplification Bias and Homogeneity Issue for
Recommendations of Large Language Models", EMNLP 2024) on the item prefix tree.

D3 changes two things in the trie-constrained beam search of BIGRec (flower_reference.md §4):

1. **No length normalisation**: ``length_penalty = 0``, so a beam's score is the plain sum of its token log-probs.
2. **Guidance by a text-free recommender** (SASRec): with p_u the SASRec softmax over items for the prompt's row u,
   a row at tree node s with allowed children c_1 … c_k (token a_j leads to c_j) gets

       P_u(c) = Σ_{items i below c} p_u(i),        cf(a_j) = log( P_u(c_j) / Σ_l P_u(c_l) ),
       score'(a_j) = g · (score(a_j) − cf(a_j)) + cf(a_j),

   with g the guidance scale. g = 1 leaves the scores unchanged; g < 1 moves them towards SASRec (g = 0: SASRec's
   token distribution alone); g > 1 moves them *away* from it (the classifier-free-guidance extrapolation).

NOTE: the official ``CFEnhancedLogitsProcessor`` computes cf and returns g·(score − cf) + cf with the script default
g = 1.0, so cf cancels and the scripted D3 is only the length-penalty removal. Here the guidance scale is an explicit
argument that takes effect for any g ≠ 1 (tested), and `trl-flower evaluate --decoding d3` requires it.

NOTE: a child whose SASRec mass underflows to 0 would get cf = −inf and an undefined score for g ≠ 1; the children's
masses are floored at the smallest normal float of the dtype before normalising (the official code has the same
hazard and no guard).

Implementation: :func:`~trl_flower.tree.PrefixTree.aggregate_to_nodes` sums each prompt's SASRec probabilities up
the tree once per batch ([B, num_nodes]). :func:`guided_edge_scores` applies the guidance to the allowed (beam, token)
pairs of the trie beam search (:mod:`trl_flower.evaluation.trie_beam_search`, the default decoder);
:class:`D3GuidanceProcessor` applies the same formula inside ``generate`` (``decoder="generate"``), where a beam's
node comes from :func:`~trl_flower.decoding.generated_nodes`, a pure function of its generated tokens, so
``generate``'s beam reordering cannot desynchronise it. No Python loop over beams or vocabulary in either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from trl_flower.decoding import generated_nodes
from trl_flower.tree import PrefixTree

__all__ = ["D3GuidanceProcessor", "guided_edge_scores", "recommend_d3", "sasrec_probabilities"]


def sasrec_probabilities(logits: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of SASRec logits [U, num_items] (float64; the official D3 softmaxes the saved logits)."""
    return torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)  # [U, M]


def guided_edge_scores(
    scores: torch.Tensor,
    rows: torch.Tensor,
    children: torch.Tensor,
    row_is_terminal: torch.Tensor,
    row_prompt: torch.Tensor,
    guidance,
) -> torch.Tensor:
    r"""D3's guided scores of allowed (row, token) pairs given as a flat edge list (the trie beam search's form).

    The same numbers as :class:`D3GuidanceProcessor`: for an edge of row r to child c,
    cf = log(P_u(c) / Σ_{children c' of r} P_u(c')) with masses floored at the dtype's smallest normal, and the
    score becomes g · (score − cf) + cf; edges of finished rows (terminal nodes) are unchanged.

    Args:
        scores: [E] float32 step scores of the edges.
        rows: [E] row of each edge (edges of a row are all its children).
        children: [E] node each edge leads to.
        row_is_terminal: [R] bool, rows sitting on a terminal node.
        row_prompt: [R] index of each row's prompt in ``guidance.node_mass``.
        guidance: a :class:`~trl_flower.evaluation.trie_beam_search.Guidance` (node masses [B, N] and scale g).

    Returns:
        [E] guided scores (a new tensor).
    """
    g = float(guidance.scale)
    if g == 1.0:
        return scores  # g·(s − cf) + cf = s
    guided = ~row_is_terminal[rows]  # [E]
    node_mass = guidance.node_mass.to(scores.device)
    tiny = torch.finfo(node_mass.dtype).tiny
    mass = node_mass[row_prompt[rows], children].clamp(min=tiny)  # [E]
    mass = torch.where(guided, mass, torch.zeros_like(mass))
    total = torch.zeros(row_prompt.shape[0], dtype=mass.dtype, device=mass.device).index_add_(0, rows, mass)  # [R]
    cf = torch.log(mass / total[rows].clamp(min=tiny)).to(scores.dtype)  # [E]
    return torch.where(guided & torch.isfinite(scores), g * (scores - cf) + cf, scores)


class D3GuidanceProcessor(LogitsProcessor):
    r"""[`LogitsProcessor`] adding D3's SASRec guidance to the allowed tokens of trie-constrained decoding.

    Put it right *after* [`TrieLogitsProcessor`] (it changes only entries that are finite, i.e. allowed): allowed
    token a_j at node s becomes ``g · (score − cf) + cf`` with cf the log of the normalised SASRec mass of the items
    below s·a_j (see the module docstring); disallowed tokens stay −inf. A row on a terminal node (finished item)
    has no children and is left unchanged.

    Args:
        tree (`PrefixTree`): the catalogue's prefix tree (items in SASRec's id order).
        item_probs (`torch.Tensor` of shape `(batch_size, num_items)`): SASRec probabilities of each prompt of this
            ``generate`` call (:func:`sasrec_probabilities` of its logits rows), in the call's batch order.
        guidance_scale (`float`): g ≥ 0; 1 = no guidance (the official default).
        prompt_length (`int`): the padded prompt length P of this call (generated tokens are ``input_ids[:, P:]``).

    Examples:
    >>> import torch
    >>> from trl_flower.tree import PrefixTree
    >>> tree = PrefixTree.from_token_paths([[5, 6, 2], [5, 2], [7, 2]], terminator_id=2)
    >>> probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)  # items 0, 1 start with 5; item 2 with 7
    >>> d3 = D3GuidanceProcessor(tree, probs, guidance_scale=0.0, prompt_length=1)
    >>> scores = torch.full((1, 8), float("-inf")); scores[0, [5, 7]] = -0.6931
    >>> d3(torch.zeros(1, 1, dtype=torch.long), scores)[0, [5, 7]].exp()  # g = 0: SASRec's mass 0.8 / 0.2
    tensor([0.8000, 0.2000])
    """

    def __init__(self, tree: PrefixTree, item_probs: torch.Tensor, guidance_scale: float, prompt_length: int) -> None:
        if not isinstance(tree, PrefixTree):
            raise ValueError(f"`tree` must be a trl_flower PrefixTree, got {type(tree).__name__}")
        item_probs = torch.as_tensor(item_probs)
        if item_probs.dim() != 2 or item_probs.shape[1] != tree.num_items:
            raise ValueError(
                f"`item_probs` must have shape [batch_size, {tree.num_items}] (one SASRec probability "
                f"row per prompt over the tree's items), got {tuple(item_probs.shape)}"
            )
        if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"`guidance_scale` must be a float >= 0 (1 = no guidance), got {guidance_scale!r}")
        if not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"`prompt_length` must be a non-negative int, got {prompt_length!r}")
        self.tree = tree
        self.guidance_scale = float(guidance_scale)
        self.prompt_length = prompt_length
        self.node_mass = tree.aggregate_to_nodes(item_probs.double())  # [B, N]: SASRec mass below every node

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """Guided scores of shape `(batch_size * num_beams, vocab_size)`; a new tensor (the input is not modified)."""
        R = scores.shape[0]
        B = self.node_mass.shape[0]
        if R % B:
            raise ValueError(f"{R} score rows are not a multiple of the {B} prompts given as `item_probs`")
        if self.guidance_scale == 1.0:
            return scores  # g·(s − cf) + cf = s
        nodes, _ = generated_nodes(self.tree, input_ids[:, self.prompt_length :].to(scores.device))  # [R]
        _, child, mask = self.tree.children(nodes)  # [R, K] child nodes, mask of real children
        if child.shape[1] == 0:  # every row finished
            return scores
        prompt = torch.arange(R, device=scores.device) // (R // B)  # [R] beams of a prompt are consecutive
        mass = self.node_mass.to(scores.device)[prompt.unsqueeze(1), child.clamp(min=0)]  # [R, K]
        tiny = torch.finfo(mass.dtype).tiny
        mass = torch.where(mask, mass.clamp(min=tiny), torch.zeros_like(mass))  # [R, K]
        cf = torch.log(mass / mass.sum(1, keepdim=True).clamp(min=tiny))  # [R, K], −inf on padding
        tokens = self.tree.tensors(scores.device).token[child.clamp(min=0)]  # [R, K]
        rows = torch.arange(R, device=scores.device).unsqueeze(1).expand_as(tokens)  # [R, K]
        rows, tokens, cf = rows[mask], tokens[mask], cf[mask].to(scores.dtype)  # [E]
        s = scores[rows, tokens]  # [E]
        g = self.guidance_scale
        out = scores.clone()  # [R, V]
        out[rows, tokens] = torch.where(torch.isfinite(s), g * (s - cf) + cf, s)  # masked tokens stay −inf
        return out


def recommend_d3(
    model,
    tokenizer,
    prompts: Sequence[str],
    tree: PrefixTree,
    sasrec_logits: np.ndarray | torch.Tensor,
    guidance_scale: float,
    *,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    show_progress: bool = False,
    **kwargs,
):
    """Top-K items per prompt with D3: trie-constrained beam search, ``length_penalty=0`` and SASRec guidance.

    Args:
        model, tokenizer, prompts, tree: as in :func:`~trl_flower.evaluation.recommend.recommend`.
        sasrec_logits: [len(prompts), num_items] SASRec logits of each prompt's row (softmaxed here).
        guidance_scale: g of :class:`D3GuidanceProcessor` (1 = the official default, no guidance).
        batch_size: prompts per decoding batch.
        **kwargs: other :func:`~trl_flower.evaluation.recommend.recommend` options (``top_k``, ``num_beams``,
            ``temperature``, ``titles``, ``max_new_tokens``, ``decoder``, ``share_prompt_cache``);
            ``length_penalty`` is fixed to 0.

    Returns:
        :class:`~trl_flower.evaluation.recommend.Recommendations` for all prompts, in order.
    """
    from trl_flower.evaluation.recommend import recommend

    if "length_penalty" in kwargs:
        raise ValueError("D3 decodes without length normalisation (length_penalty=0); do not pass length_penalty")
    if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
        raise ValueError(f"`guidance_scale` must be a float >= 0 (1 = no guidance), got {guidance_scale!r}")
    logits = np.asarray(sasrec_logits)
    if logits.shape != (len(prompts), tree.num_items):
        raise ValueError(
            f"`sasrec_logits` must have shape [{len(prompts)} prompts, {tree.num_items} items], got {logits.shape}"
        )
    return recommend(
        model,
        tokenizer,
        prompts,
        tree,
        batch_size=batch_size,
        length_penalty=0.0,
        add_special_tokens=add_special_tokens,
        show_progress=show_progress,
        guidance=(sasrec_probabilities(logits), float(guidance_scale)),
        **kwargs,
    )
