r"""Per-user flows on the prefix tree: every training row u gets its own item rewards R_u(i) and conserved flows.

The shared flows of :class:`~trl_flower.tree.PrefixTree` are the same for every user, so a flow loss that follows
them pulls every user's next-token distribution towards one popularity prior. Per-user flows
F_u(n) = Σ_{items i below n} R_u(i) keep the tree's conservation law (F_u(n) = Σ_children F_u(c)) for each row, so
the process rewards r_u(c|n) = F_u(c)/F_u(n) are a proper distribution at every node and sampling with them draws
item i with probability R_u(i)/Z_u, Z_u = F_u(root).

The distilled reward of :class:`~trl_flower.rewards.PrefixTreeRewardModel` (``variant="distill"``)::

    R_u(i) = (R(i) + ε)^α · p_u(i)^β,        p_u = softmax(logits_u / τ)

with R(i) the item reward (interaction counts), logits_u the auxiliary recommender's (e.g. SASRec's) logits for
row u, α the weight of popularity, β the weight of the recommender's preferences and τ its softmax temperature.
α = 1, β = 0, ε = 0 gives back the shared flows (variant ``"none"``); α = 0, β = 1 is plain distillation of the
recommender's distribution through the tree. Computed in log space throughout:
log R_u(i) = α·log(R(i) + ε) + β·log p_u(i) (with the convention 0^0 = 1, so α = 0 ignores R even where R = 0).

Two representations with one query, ``log_flows(nodes)``:

* :class:`DenseUserFlows`: the full table [B, num_nodes] (exact for any rewards; O(B · num_nodes) memory).
* :class:`TopNUserFlows`: each row keeps its n items of highest p_u; the other items share one floor probability
  f_u = (1 − Σ_{top n} p_u) / (M − n), their mean, so total preference mass is kept. Then

      F_u(n) = f_u^β · W(n) + Σ_{i ∈ top_u, i below n} w(i) · (p_u(i)^β − f_u^β),      w(i) = (R(i) + ε)^α

  with W(n) = Σ_{i below n} w(i) shared by all rows. The per-row part lives only on the ancestors of the top-n
  items: memory O(B · n · depth), independent of the catalogue's size. Each correction is ≥ 0 (a top item's p_u is
  at least the mean of the others), so there is no cancellation. With n ≥ M it equals the dense table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trl_flower.tree import PrefixTree, scatter_logsumexp

__all__ = [
    "DenseUserFlows",
    "DistilledReward",
    "TopNUserFlows",
    "dense_user_flows",
    "log_item_weights",
    "log_preferences",
    "top_n_preferences",
    "top_n_user_flows",
]


@dataclass(frozen=True)
class DistilledReward:
    """Settings of the distilled per-user reward R_u(i) = (R(i) + ε)^α · softmax(logits_u / τ)_i^β.

    Attributes:
        alpha: α ≥ 0, exponent of the item reward (popularity); 0 ignores it.
        beta: β ≥ 0, exponent of the auxiliary recommender's preference p_u; 0 ignores it.
        temperature: τ > 0 of p_u = softmax(logits_u / τ); > 1 flattens, < 1 sharpens the recommender.
        epsilon: ε ≥ 0 added to R(i) before the power, so items without interactions can get a share.
        top_n: 0 for exact dense per-user flows; n ≥ 1 keeps each row's n most preferred items and gives the others
            a shared floor (memory independent of the catalogue size; equal to dense when n ≥ the item count).
    """

    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 1.0
    epsilon: float = 0.0
    top_n: int = 0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "epsilon"):
            value = getattr(self, name)
            if not (0 <= value < float("inf")):
                raise ValueError(f"distilled reward: {name} must be finite and >= 0, got {value}")
        if not (0 < self.temperature < float("inf")):
            raise ValueError(f"distilled reward: temperature τ must be finite and > 0, got {self.temperature}")
        if self.top_n < 0:
            raise ValueError(f"distilled reward: top_n must be 0 (dense) or >= 1, got {self.top_n}")

    def user_flows(
        self, tree: PrefixTree, log_weights: torch.Tensor, base_log_flows: torch.Tensor, logits
    ) -> DenseUserFlows | TopNUserFlows:
        """Per-row flows for the logits rows [B, M] (numpy, memory map or tensor).

        Args:
            log_weights: [M] log w(i) = :func:`log_item_weights` (item_rewards, alpha, epsilon).
            base_log_flows: [num_nodes] ``tree.log_aggregate_to_nodes(log_weights)`` (used by top-n only).
        """
        if self.top_n:
            items, log_p, log_floor = top_n_preferences(logits, self.temperature, self.top_n)
            return top_n_user_flows(tree, log_weights, base_log_flows, items, log_p, log_floor, self.beta)
        log_p = log_preferences(torch.as_tensor(np.asarray(logits)), self.temperature)  # [B, M]
        log_r = log_weights.unsqueeze(0) + (self.beta * log_p if self.beta != 0 else torch.zeros_like(log_p))  # [B, M]
        return dense_user_flows(tree, log_r)


def log_item_weights(item_rewards: np.ndarray | torch.Tensor, alpha: float, epsilon: float = 0.0) -> torch.Tensor:
    """log w(i) = α · log(R(i) + ε) as float64 [M], with 0^0 = 1 (α = 0 gives 0 everywhere, also where R + ε = 0).

    Example:
        >>> log_item_weights(np.array([0.0, 1.0, 3.0]), alpha=0.5).exp()
        tensor([0.0000, 1.0000, 1.7321], dtype=torch.float64)
    """
    if alpha < 0 or epsilon < 0:
        raise ValueError(f"alpha and epsilon must be >= 0, got alpha={alpha}, epsilon={epsilon}")
    r = torch.as_tensor(np.asarray(item_rewards, dtype=np.float64)) + epsilon  # [M]
    if alpha == 0:
        return torch.zeros_like(r)
    return alpha * torch.log(r)  # [M], −inf where R + ε = 0


def log_preferences(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_u = log_softmax(logits_u / τ) per row, float64 [B, M]."""
    if not temperature > 0:
        raise ValueError(f"the preference temperature τ must be > 0, got {temperature}")
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=-1)


@dataclass(frozen=True)
class DenseUserFlows:
    """Per-row log flows as a full table.

    Attributes:
        table: [B, num_nodes] float64 log F_u(n) (−inf for zero flow).
    """

    table: torch.Tensor

    def log_flows(self, nodes: torch.Tensor) -> torch.Tensor:
        """log F_u at `nodes` [B, ...] (row b of the table for row b of `nodes`); −inf at node -1."""
        flat = nodes.reshape(nodes.shape[0], -1)  # [B, X]
        lf = self.table.to(nodes.device).gather(1, flat.clamp(min=0)).reshape(nodes.shape)  # [B, ...]
        return torch.where(nodes >= 0, lf, torch.full_like(lf, float("-inf")))


def dense_user_flows(tree: PrefixTree, log_item_rewards: torch.Tensor) -> DenseUserFlows:
    """Push per-row log item rewards [B, M] through the tree (log-sum-exp up every node): [B, num_nodes]."""
    return DenseUserFlows(tree.log_aggregate_to_nodes(torch.as_tensor(log_item_rewards, dtype=torch.float64)))


def top_n_preferences(
    logits: torch.Tensor | np.ndarray, temperature: float, n: int, chunk_rows: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's n most preferred items and the floor shared by the rest (see the module docstring).

    Rows are processed `chunk_rows` at a time, so the transient [rows × M] softmax stays small.

    Args:
        logits: [B, M] auxiliary-model logits (numpy, memory map or tensor).
        temperature: τ of p_u = softmax(logits_u / τ).
        n: items kept per row (clipped to M).

    Returns:
        items [B, n'] int64 (n' = min(n, M), by decreasing p_u), log_p [B, n'] float64 their log p_u, and
        log_floor [B] float64 log f_u = log((1 − Σ_top p_u) / (M − n')), −inf when n' = M (nothing is left).
    """
    if n < 1:
        raise ValueError(f"top-n needs n >= 1 items per row, got {n}")
    B, M = int(logits.shape[0]), int(logits.shape[1])
    k = min(n, M)
    items, log_p, log_floor = [], [], []
    for lo in range(0, B, chunk_rows):
        lp = log_preferences(torch.as_tensor(np.asarray(logits[lo : lo + chunk_rows])), temperature)  # [c, M]
        top = lp.topk(k, dim=1)  # [c, k]
        items.append(top.indices)
        log_p.append(top.values)
        if k == M:
            log_floor.append(torch.full((lp.shape[0],), float("-inf"), dtype=torch.float64))
        else:
            # rest mass 1 − Σ_top p, as log1p(−Σ_top p) computed from the top's log-sum-exp (exact near 0 and 1)
            log_rest = torch.log(-torch.expm1(torch.logsumexp(top.values, dim=1)))  # [c]
            log_floor.append(log_rest - np.log(M - k))
    return torch.cat(items), torch.cat(log_p), torch.cat(log_floor)


@dataclass(frozen=True)
class TopNUserFlows:
    """Per-row log flows from a shared base and sparse per-row corrections (see the module docstring).

    Attributes:
        base_log_flows: [num_nodes] float64 log W(n), the flows of the weights w(i) alone.
        log_floor_weight: [B] float64 β · log f_u (−inf when a row keeps every item).
        keys: [U] int64 sorted keys b · num_nodes + n of the nodes carrying a correction in row b.
        log_corrections: [U] float64 log Σ_{i ∈ top_b below n} w(i) · (p_b(i)^β − f_b^β).
        num_nodes: the tree's node count (to decode keys).
    """

    base_log_flows: torch.Tensor
    log_floor_weight: torch.Tensor
    keys: torch.Tensor
    log_corrections: torch.Tensor
    num_nodes: int

    def log_flows(self, nodes: torch.Tensor) -> torch.Tensor:
        """log F_u at `nodes` [B, ...]; −inf at node -1."""
        device = nodes.device
        B = nodes.shape[0]
        flat = nodes.reshape(B, -1)  # [B, X]
        safe = flat.clamp(min=0)  # [B, X]
        base = self.base_log_flows.to(device)[safe] + self.log_floor_weight.to(device).unsqueeze(1)  # [B, X]
        query = torch.arange(B, device=device).unsqueeze(1) * self.num_nodes + safe  # [B, X]
        keys = self.keys.to(device)
        pos = torch.searchsorted(keys, query).clamp(max=max(keys.numel() - 1, 0))  # [B, X]
        if keys.numel():
            found = keys[pos] == query  # [B, X]
            corr = torch.where(found, self.log_corrections.to(device)[pos], float("-inf"))  # [B, X]
        else:
            corr = torch.full_like(base, float("-inf"))
        lf = torch.logaddexp(base, corr).reshape(nodes.shape)  # [B, ...]
        return torch.where(nodes >= 0, lf, torch.full_like(lf, float("-inf")))


def top_n_user_flows(
    tree: PrefixTree,
    log_weights: torch.Tensor,
    base_log_flows: torch.Tensor,
    items: torch.Tensor,
    log_p: torch.Tensor,
    log_floor: torch.Tensor,
    beta: float,
) -> TopNUserFlows:
    """Build :class:`TopNUserFlows` from :func:`top_n_preferences`' output.

    Args:
        tree: the catalogue's tree.
        log_weights: [M] log w(i) (:func:`log_item_weights`).
        base_log_flows: [num_nodes] log W(n) = ``tree.log_aggregate_to_nodes(log_weights)`` (computed once).
        items, log_p, log_floor: [B, n], [B, n], [B] from :func:`top_n_preferences`.
        beta: β, the exponent of p_u.
    """
    B, n = items.shape
    log_floor_weight = beta * log_floor if beta != 0 else torch.zeros_like(log_floor)  # [B] (f^0 = 1)
    log_top_weight = beta * log_p if beta != 0 else torch.zeros_like(log_p)  # [B, n]
    # log (p^β − f^β) = β log p + log(1 − exp(β log f − β log p)); −inf when p = f (nothing to correct)
    gap = (log_floor_weight.unsqueeze(1) - log_top_weight).clamp(max=0.0)  # [B, n] ≤ 0 since p ≥ f
    log_excess = log_top_weight + torch.log(-torch.expm1(gap))  # [B, n]
    log_delta = log_weights[items] + log_excess  # [B, n]

    parent = torch.as_tensor(tree.parent)
    node = torch.as_tensor(tree.item_node)[items]  # [B, n] terminal nodes of the kept items
    chain = [node]
    while bool((chain[-1] > 0).any()):  # walk up to the root (parent of the root is -1)
        up = chain[-1]
        chain.append(torch.where(up > 0, parent[up.clamp(min=0)], torch.full_like(up, -1)))
    ancestors = torch.stack(chain, dim=-1)  # [B, n, D+1] terminal node … root, then -1
    row = torch.arange(B).view(B, 1, 1).expand_as(ancestors)  # [B, n, D+1]
    keep = (ancestors >= 0) & torch.isfinite(log_delta).unsqueeze(-1)  # [B, n, D+1]
    keys = (row * tree.num_nodes + ancestors)[keep]  # [E]
    values = log_delta.unsqueeze(-1).expand_as(ancestors)[keep]  # [E]
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # [U], [E]
    sums = torch.full((1, unique.numel()), float("-inf"), dtype=torch.float64)
    sums = scatter_logsumexp(sums, inverse, values.unsqueeze(0)).squeeze(0)  # [U] log Σ per (row, node)
    return TopNUserFlows(
        base_log_flows=torch.as_tensor(base_log_flows, dtype=torch.float64),
        log_floor_weight=log_floor_weight,
        keys=unique,
        log_corrections=sums,
        num_nodes=tree.num_nodes,
    )
