r"""The exact distribution an LM puts on the catalogue, and how close it is to another recommender's.

Beam search shows an LM's *modes*; sampling shows its distribution only up to sampling noise. For a diagnosis of
what a Flower run has learnt (did the LM take in the auxiliary recommender's per-user distribution :math:`p_u`, or
only its head?) this module scores every catalogue title under one prompt,

.. math::
    \log q_u(\text{title}) = \sum_{t} \log \pi_\theta(y_t \mid x_u, y_{<t}),

the full-vocabulary token log-probabilities along the title's path in the prefix tree, terminator included (the
quantity beam search ranks by, before its length penalty), and compares the renormalised :math:`q_u` with
:math:`p_u` (:func:`agreement`). Titles are the unit: duplicate titles share one path, so an item distribution is
first summed per title (:func:`item_to_title_mass`).

Cost: the prompt runs once, its KV cache is repeated for a chunk of titles, and each chunk is one forward of its
paths (no [titles × prompt] recomputation).
"""

from __future__ import annotations

import numpy as np
import torch

from trl_flower.tree import PrefixTree


def title_nodes(tree: PrefixTree) -> tuple[np.ndarray, np.ndarray]:
    """The distinct titles of a tree: their terminal nodes (ascending) and, for every item id, its title index.

    Returns:
        ``(nodes [T], title_of_item [N])``; ``nodes[title_of_item[i]]`` is item i's terminal node.
    """
    nodes, title_of_item = np.unique(np.asarray(tree.item_node), return_inverse=True)
    return nodes, title_of_item


def title_items(title_of_item: np.ndarray) -> np.ndarray:
    """The smallest item id of every title [T] (its representative: the id beam search reports for it)."""
    first = np.full(int(title_of_item.max()) + 1, len(title_of_item), dtype=np.int64)
    np.minimum.at(first, title_of_item, np.arange(len(title_of_item)))
    return first


@torch.no_grad()
def title_log_probs(
    model,
    prompt_ids: list[int],
    tree: PrefixTree,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Log-probability of every distinct title of `tree` after one prompt (full-vocabulary softmax).

    Args:
        model: a causal LM (eval mode) whose forward accepts ``past_key_values``.
        prompt_ids: the prompt's token ids, as the decoder feeds them.
        tree: the catalogue's prefix tree (paths include the terminator).
        chunk_size: titles per forward; memory is about chunk_size × longest path × vocabulary floats.

    Returns:
        float64 [T] in the order of :func:`title_nodes` (ascending terminal node).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; a prompt needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = next(model.parameters()).device
    nodes, title_of_item = title_nodes(tree)
    first_item = title_items(title_of_item)
    # chunks of titles of like lengths: less padding
    by_length = np.argsort(np.asarray(tree.item_length)[first_item], kind="stable")
    prompt = torch.tensor([prompt_ids], device=device)  # [1, P]
    out = model(input_ids=prompt, use_cache=True)
    first_logp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)  # [V]: the first title token's distribution
    prompt_cache = out.past_key_values
    result = torch.empty(len(nodes), dtype=torch.float64)
    for start in range(0, len(nodes), chunk_size):
        which = by_length[start : start + chunk_size]
        items = torch.as_tensor(first_item[which], device=device)
        paths, lengths = tree.item_paths(items, pad_id=0)  # [C, L], [C]; pad 0 is a real token, masked below
        C, L = paths.shape
        logp = first_logp[paths[:, 0]]  # [C]
        if L > 1:
            cache = _repeated(prompt_cache, C)
            mask = torch.ones((C, len(prompt_ids) + L - 1), dtype=torch.long, device=device)
            # right padding needs no mask: a causal model's earlier positions never see the pads after them
            logits = model(input_ids=paths[:, :-1], attention_mask=mask, past_key_values=cache).logits  # [C, L-1, V]
            picked = logits.gather(-1, paths[:, 1:, None])[..., 0].double()  # [C, L-1]
            step = picked - torch.logsumexp(logits, dim=-1).double()  # float32 normaliser: 1e-6 per token
            inside = torch.arange(1, L, device=device)[None, :] < lengths[:, None]  # [C, L-1]
            logp = logp + (step * inside).sum(dim=1)
        result[torch.as_tensor(which)] = logp.cpu()
    return result


def _repeated(cache, copies: int):
    """A copy of a batch-1 KV cache repeated `copies` times along the batch (the prompt's cache stays intact)."""
    import copy

    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(copies)
    return cache


def item_to_title_mass(item_probs: np.ndarray, title_of_item: np.ndarray, num_titles: int) -> np.ndarray:
    """Sum an item distribution [..., N] into its titles [..., T] (duplicate titles pool their items' mass)."""
    item_probs = np.asarray(item_probs, dtype=np.float64)
    flat = item_probs.reshape(-1, item_probs.shape[-1])  # [R, N]
    out = np.zeros((flat.shape[0], num_titles))
    for r in range(flat.shape[0]):
        out[r] = np.bincount(title_of_item, weights=flat[r], minlength=num_titles)
    return out.reshape(*item_probs.shape[:-1], num_titles)


def agreement(log_q: np.ndarray, p: np.ndarray, k: int = 10) -> dict[str, float]:
    r"""How close an LM's title distribution is to a target one, for one user.

    Args:
        log_q: [T] the LM's title log-probabilities (:func:`title_log_probs`; not necessarily normalised).
        p: [T] the target's title probabilities (sums to 1).
        k: the top-k cut-off.

    Returns:
        ``kl_p_q``: KL(p‖q̂) with q̂ = q renormalised over the catalogue (nats; how much of p the LM misses);
        ``catalogue_mass``: Σ q before renormalising (the share of the LM's mass that lands on a title at all);
        ``top_overlap``: |top-k(q) ∩ top-k(p)| / k; ``q_top_mass_of_p``: p's mass on q's top k.
    """
    log_q = np.asarray(log_q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if log_q.shape != p.shape or log_q.ndim != 1:
        raise ValueError(f"log_q and p must be 1-D of one length, got {log_q.shape} and {p.shape}")
    k = min(k, len(p))
    norm = np.logaddexp.reduce(log_q)
    log_q_hat = log_q - norm
    support = p > 0
    kl = float(np.sum(p[support] * (np.log(p[support]) - log_q_hat[support])))
    top_q = np.argsort(-log_q, kind="stable")[:k]
    top_p = np.argsort(-p, kind="stable")[:k]
    return {
        "kl_p_q": kl,
        "catalogue_mass": float(np.exp(norm)),
        "top_overlap": len(set(top_q.tolist()) & set(top_p.tolist())) / k,
        "q_top_mass_of_p": float(p[top_q].sum()),
    }
