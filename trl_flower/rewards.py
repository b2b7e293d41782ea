r"""Token-level and sequence-level rewards on the prefix tree (Flower, arXiv 2503.07377, §3.3).

One object, :class:`PrefixTreeRewardModel`, turns a :class:`~trl_flower.tree.PrefixTree` with item rewards R(i) into

* **token-level targets** for the flow losses in :mod:`trl_flower.losses` (:meth:`~PrefixTreeRewardModel.token_targets`
  for the sampled path, :meth:`~PrefixTreeRewardModel.child_targets` for all children of the visited states), and
* **one scalar per completion** through TRL's reward-function protocol (``__call__``), so GRPO/RLOO/PPO can use the
  same catalogue as a reward.

Process rewards (Eq. 10). With flows F(s) = Σ_{items i below s} R(i) (so F(s_0) = Z), the log process reward of the
k-th title token and the termination target at the end of the title (t = t_b title tokens) are::

    ℓ_k    = log F(s_{k+1}) − log F(s_k)              k = 0 … t−1
    term   = log R(y) − log F(s_t)                    (the ⊤ action; R(y) = F(terminal node))

so Σ_k ℓ_k + term = log R(y)/Z.

Personalisation (§3.3.3, reference notes §1.5–1.6). An auxiliary recommender (SASRec) gives logits per (training
row u, item i); p(u, ·) = softmax over items; two normalisations of p::

    "mid":    s(u, i) = (p_i − mean_j p_j) / (max_j p_j − min_j p_j) + 1      ∈ [0, 2]   (div_s, exact)
    "minmax": s(u, i) = (p_i − min_j p_j) / (max_j p_j − min_j p_j)          ∈ [0, 1]   (add_logs, PPO reward)

A row whose probabilities are all equal carries no preference and gets s ≡ 1 (the formulas would divide by 0).
The per-sample score s_b of a sampled title is s(u_b, ·) at its terminal node. For a duplicate title (a terminal
node with several item ids) it is the *reward-weighted mean* Σ_i R(i) s(u, i) / Σ_i R(i) of its items (plain mean
if all of them have R = 0), which makes R(y)·s(u, y) = Σ_i R(i)·s(u, i), the exact variant's per-user reward.
NOTE: the official code joins SASRec scores by title and uses the *last* item id with that title (reference §0.8).

Variants of the token targets:

==========  ==================================================  ==============================================
variant     ℓ_k                                                 termination target at t_b
==========  ==================================================  ==============================================
none        log F(s_{k+1})/F(s_k)                               log R(y)/F(s_t)
div_s       ℓ_k / s_b                                           term / s_b                (paper default)
add_logs    ℓ_k + log(s_b + 1e-20)                              term + log(s_b + 1e-20)
exact       log F_u(s_{k+1})/F_u(s_k),  F_u from R(i)·s(u, i)   log R(y)s(u, y)/F_u(s_t)
distill     log F_u(s_{k+1})/F_u(s_k),  F_u from R_u(i)         log R_u(y)/F_u(s_t)
==========  ==================================================  ==============================================

``distill`` (ours, not in the paper) uses R_u(i) = (R(i) + ε)^α · p_u(i)^β with p_u = softmax(logits_u / τ), the
auxiliary recommender's full distribution rather than a rescaling of R by s ∈ [0, 2]; see
:mod:`trl_flower.user_flows` (dense, or each row's top-n items plus a shared floor).

``div_s`` and ``add_logs`` scale every token of the path by the score of the *sampled leaf*, so targets on a shared
prefix depend on which title was sampled (the flow is not consistent, as in the official code). ``exact`` and
``distill`` push per-user item rewards (R(i)·s(u, i) with s = "mid" ≥ 0, resp. R_u(i)) through the tree in log space
with :meth:`~trl_flower.tree.PrefixTree.log_aggregate_to_nodes`, so per-user flows are conserved at every node; the
dense table costs O(B · num_nodes) memory and time per call (``distill`` with top-n: O(B · n · depth)).

Invalid and zero-reward paths. A row that is not a complete catalogue path (wrong token, no terminator) or whose
title has zero (per-user) reward has no finite target. Such rows get ``valid = False`` and, as in the official code,
ℓ = −15 from the first bad token on and a termination target of `nonterminal_log_term` (−15) at every k ≤ t_b, so
the targets stay finite; the loss should drop them through ``valid`` (``lengths * valid`` zeroes their segments).
With the trie-constrained sampler and ``positive_flow_only=True`` neither ever happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trl_flower.tree import INVALID, PrefixTree
from trl_flower.user_flows import DenseUserFlows, DistilledReward, TopNUserFlows, log_item_weights

__all__ = ["PrefixTreeRewardModel", "TokenTargets", "normalize_preferences"]

VARIANTS = ("none", "div_s", "add_logs", "exact", "distill")
SEQUENCE_REWARDS = ("minmax", "log_share", "raw")
NORMALIZATIONS = ("mid", "minmax")
INVALID_LOG_REWARD = -15.0  # ℓ of a token that leaves the catalogue (official constant)
LOG_EPS = 1e-20  # add_logs: log(s + 1e-20), as in the official code


def normalize_preferences(p: torch.Tensor, method: str) -> torch.Tensor:
    """Per-row normalisation of auxiliary-model probabilities p [B, M] into preference scores s [B, M].

    ``"mid"``: s = (p − mean_j p) / (max_j p − min_j p) + 1 ∈ [0, 2] (official `normalize_element_mid`);
    ``"minmax"``: s = (p − min_j p) / (max_j p − min_j p) ∈ [0, 1] (official `normalize_element`).
    Rows with max = min (no preference) get s ≡ 1.

    Example:
        >>> normalize_preferences(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64), "minmax")
        tensor([[1.0000, 0.3333, 0.0000]], dtype=torch.float64)
    """
    hi = p.max(dim=-1, keepdim=True).values  # [B, 1]
    lo = p.min(dim=-1, keepdim=True).values  # [B, 1]
    span = hi - lo  # [B, 1]
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    if method == "mid":
        s = (p - p.mean(dim=-1, keepdim=True)) / span + 1.0  # [B, M]
    elif method == "minmax":
        s = (p - lo) / span  # [B, M]
    else:
        raise ValueError(f"score normalisation must be one of {NORMALIZATIONS}, got {method!r}")
    return torch.where(flat, torch.ones_like(s), s).clamp(min=0.0)  # clamp: rounding can give -1e-17


@dataclass(frozen=True)
class TokenTargets:
    """Token-level targets of a batch of sampled paths (float64; cast them to the loss dtype yourself).

    T = max t_b over the batch. Entries beyond a row's t_b are 0 (targets) or -1 (nodes).

    Attributes:
        lengths: [B] int64 t_b, the number of title tokens = index of the first terminator (row length if none).
        log_reward: [B, T] ℓ_k, the (variant-adjusted) log process reward of title token k (k < t_b).
        log_term_target: [B, T+1] `nonterminal_log_term` for k < t_b, the (variant-adjusted) log R(y)/F(s_{t_b})
            at k = t_b.
        valid: [B] bool, the row is a complete catalogue path with positive (per-user) reward. Drop the others.
        complete: [B] bool, the row is a complete catalogue path (its reward may be 0).
        terminal_nodes: [B] int64 terminal node reached after the terminator, -1 if not complete.
        item_ids: [B] int64 representative (smallest) item id of the terminal node, -1 if not complete.
        nodes: [B, T+1] int64 states s_0 … s_{t_b} visited (root first), -1 beyond t_b or after a wrong token.
        scores: [B] float64 s_b used by the variant (1 for ``none`` and ``exact``, and for incomplete rows).
    """

    lengths: torch.Tensor
    log_reward: torch.Tensor
    log_term_target: torch.Tensor
    valid: torch.Tensor
    complete: torch.Tensor
    terminal_nodes: torch.Tensor
    item_ids: torch.Tensor
    nodes: torch.Tensor
    scores: torch.Tensor


class PrefixTreeRewardModel:
    """Flower's rewards on a prefix tree: token targets for the flow losses and TRL's reward-function protocol.

    Args:
        tree: the catalogue's :class:`~trl_flower.tree.PrefixTree` (its structure is shared, not copied).
        item_rewards: R(i) ≥ 0 per item id: an array [num_items] or a mapping {item_id: reward} (missing ids get 0).
            Default: ``tree.item_rewards``. The trainer passes interaction counts.
        variant: personalisation of the token targets: ``"none"``, ``"div_s"`` (paper default), ``"add_logs"``,
            ``"exact"`` or ``"distill"`` (see the module docstring). All but ``"none"`` need `preference_scores`.
        preference_scores: auxiliary-model logits [num_rows, num_items] (numpy array, ``np.load(..., mmap_mode="r")``
            memory map, or tensor). Only the rows of the current batch are read and softmaxed.
        score_normalization: ``"mid"`` or ``"minmax"``, overriding the defaults ("mid" for div_s, exact and the
            raw/log_share sequence rewards; "minmax" for add_logs and the minmax sequence reward).
        tokenizer: used by ``__call__`` to tokenise text completions when `completion_ids` is not given.
        sequence_reward: what ``__call__`` returns per completion: ``"minmax"``, ``"log_share"`` or ``"raw"``.
            Default (None): ``"log_share"`` for ``"distill"`` (log R_u(y)/Z_u), ``"minmax"`` otherwise.
        invalid_reward: ``__call__``'s value for a completion that is not a catalogue title (and, under
            ``"log_share"``, for a zero-reward title, whose log-share is −inf).
        nonterminal_log_term: termination target log ρ at every state before the end of the title (official: −15).
        title_log_term: the termination target at a state *before* the sampled title's end that is itself a complete
            title (e.g. "Back to Life" on the way to "Back to Life Again"). ``"official"`` uses
            `nonterminal_log_term` there, as the official code does; the two conditions on π(⊤|s) then conflict
            (≈ 13 nats apart), so the SubTB loss can never reach 0 and pushes π(⊤|title) towards 0. ``"flow"``
            uses that title's own (variant-adjusted) log R(s)/F(s), which is consistent with the flows.
        row_column: the dataset column holding each prompt's row of `preference_scores` (TRL passes it in kwargs).
        distill: the α, β, τ, ε and top-n of ``variant="distill"`` (default `DistilledReward()`: α = β = τ = 1);
            only allowed with that variant.

    Raises:
        ValueError: unknown option, a variant that needs `preference_scores` without them, `preference_scores`
            whose second dimension is not ``tree.num_items``, all-zero rewards, or an `invalid_reward` that would
            outrank valid titles under ``"log_share"``.
    """

    def __init__(
        self,
        tree: PrefixTree,
        item_rewards: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
        variant: str = "none",
        preference_scores: Any = None,
        score_normalization: str | None = None,
        tokenizer: Any = None,
        sequence_reward: str | None = None,
        invalid_reward: float = 0.0,
        nonterminal_log_term: float = -15.0,
        row_column: str = "row_index",
        title_log_term: str = "official",
        distill: DistilledReward | None = None,
    ) -> None:
        if title_log_term not in ("official", "flow"):
            raise ValueError(f"`title_log_term` must be 'official' or 'flow', got {title_log_term!r}")
        self.title_log_term = title_log_term
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        if distill is not None and variant != "distill":
            raise ValueError(f"`distill` settings only apply to variant='distill', got variant={variant!r}")
        if sequence_reward is None:
            sequence_reward = "log_share" if variant == "distill" else "minmax"
        if variant == "distill" and sequence_reward == "minmax":
            raise ValueError(
                "variant='distill' has per-user rewards R_u(y) without a catalogue-wide min and max; use "
                "sequence_reward='log_share' (log R_u(y)/Z_u, the default) or 'raw' (R_u(y))."
            )
        if variant == "distill" and score_normalization is not None:
            raise ValueError("variant='distill' uses softmax(logits / τ), not a score normalisation; drop it.")
        if sequence_reward not in SEQUENCE_REWARDS:
            raise ValueError(f"`sequence_reward` must be one of {SEQUENCE_REWARDS}, got {sequence_reward!r}")
        if score_normalization is not None and score_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`score_normalization` must be None or one of {NORMALIZATIONS}, got {score_normalization!r}"
            )
        if variant != "none" and preference_scores is None:
            raise ValueError(
                f"variant={variant!r} personalises the targets with auxiliary-model scores s(u, i); pass "
                "`preference_scores` ([num_rows, num_items] logits, e.g. SASRec's) or use variant='none'."
            )
        if variant == "div_s" and score_normalization == "minmax":
            raise ValueError(
                "variant='div_s' divides log rewards by s, and the 'minmax' normalisation gives s = 0 to each row's "
                "least preferred item; use score_normalization='mid' (the official choice) or None."
            )
        if preference_scores is not None:
            shape = tuple(getattr(preference_scores, "shape", ()))
            if len(shape) != 2 or shape[1] != tree.num_items:
                raise ValueError(
                    f"`preference_scores` must be [num_rows, num_items={tree.num_items}] (one logit per training row "
                    f"and item id of the tree), got shape {shape}."
                )
        self.tree = tree.with_rewards(_reward_array(item_rewards, tree))
        self.variant = variant
        self.distill = (distill or DistilledReward()) if variant == "distill" else None
        self.preference_scores = preference_scores
        self.score_normalization = score_normalization
        self.tokenizer = tokenizer
        self.sequence_reward = sequence_reward
        self.invalid_reward = float(invalid_reward)
        self.nonterminal_log_term = float(nonterminal_log_term)
        self.row_column = row_column
        self.__name__ = "prefix_tree_reward"  # TRL logs rewards under the callable's __name__

        # log F(n) in log space (rewards near 1e308 would overflow a plain sum); = log R(y) at terminal nodes
        self.node_log_reward = self.tree.log_flow  # [N]
        self.node_reward = self.tree.aggregate_to_nodes(self.tree.item_rewards)  # [N] plain sums, for "raw" only
        if not np.isfinite(self.node_log_reward[0]):
            raise ValueError("all item rewards are 0: there is no flow to follow (Z = 0); give some items R > 0.")
        terminal_log_rewards = self.node_log_reward[self.tree.is_terminal]  # [num titles]
        self._log_reward_lo, self._log_reward_hi = float(terminal_log_rewards.min()), float(terminal_log_rewards.max())
        if self.distill is not None:
            # w(i) = (R(i) + ε)^α and its flows W(n), shared by every row (the top-n flows' base)
            self._log_weights = log_item_weights(self.tree.item_rewards, self.distill.alpha, self.distill.epsilon)
            self._base_log_flows = self.tree.log_aggregate_to_nodes(self._log_weights)  # [N]
            if not torch.isfinite(self._base_log_flows[0]) and self.distill.beta == 0:
                raise ValueError("variant='distill': every (R(i) + ε)^α is 0; raise epsilon or lower alpha to 0.")
        if sequence_reward == "log_share" and self.distill is None:
            positive = terminal_log_rewards[np.isfinite(terminal_log_rewards)]
            lowest = float(positive.min() - self.node_log_reward[0])
            if not self.invalid_reward < lowest:
                raise ValueError(
                    f"with sequence_reward='log_share' every valid title gets log R(y)/Z >= {lowest:.3f}, so "
                    f"invalid_reward={self.invalid_reward} would rank invalid completions above valid ones; set "
                    f"invalid_reward below it (e.g. {np.floor(lowest) - 10:.0f})."
                )

    # ------------------------------------------------------------------ personalisation

    def _normalization(self, default: str) -> str:
        return self.score_normalization or default

    def item_scores(self, rows: torch.Tensor, method: str) -> torch.Tensor:
        """s(u, i) for the training rows `rows` [B]: softmax of their logits, then :func:`normalize_preferences`.

        Returns:
            [B, num_items] float64 on CPU. Only these B rows of `preference_scores` are read.
        """
        idx = self._row_indices(rows)
        logits = torch.as_tensor(np.asarray(self.preference_scores[idx], dtype=np.float64))  # [B, M]
        p = torch.softmax(logits, dim=-1)  # [B, M]
        return normalize_preferences(p, method)

    def _row_indices(self, rows: torch.Tensor) -> np.ndarray:
        """`rows` [B] as int64 numpy indices into `preference_scores`, checked."""
        if self.preference_scores is None:
            raise ValueError("this reward model has no `preference_scores`; pass them to personalise rewards.")
        idx = np.asarray(torch.as_tensor(rows).detach().cpu(), dtype=np.int64).reshape(-1)  # [B]
        num_rows = int(self.preference_scores.shape[0])
        if idx.size and (idx.min() < 0 or idx.max() >= num_rows):
            raise ValueError(
                f"row indices must lie in [0, {num_rows}) (rows of `preference_scores`), got {idx.tolist()}"
            )
        return idx

    def terminal_scores(self, s_item: torch.Tensor, terminal_nodes: torch.Tensor) -> torch.Tensor:
        """Score of each row's title: reward-weighted mean of s over the items ending at its terminal node.

        s_b = Σ_{i ∈ items(n_b)} R(i) s[b, i] / Σ_{i ∈ items(n_b)} R(i)  (plain mean if that denominator is 0;
        1 where n_b = -1).

        Args:
            s_item: [B, num_items] item scores of each row.
            terminal_nodes: [B] terminal node per row (-1 for incomplete rows).

        Returns:
            [B] float64, on the device of `terminal_nodes`.
        """
        term = terminal_nodes.detach().cpu()  # [B]
        item_node = torch.as_tensor(self.tree.item_node)  # [M]
        member = (item_node.unsqueeze(0) == term.unsqueeze(1)).to(torch.float64)  # [B, M]
        weight = member * torch.as_tensor(self.tree.item_rewards).unsqueeze(0)  # [B, M]
        weight = torch.where((weight.sum(1) > 0).unsqueeze(1), weight, member)  # zero-reward title: plain mean
        den = weight.sum(1)  # [B]
        s = (weight * s_item).sum(1) / den.clamp(min=1e-300)  # [B]
        return torch.where(den > 0, s, torch.ones_like(s)).to(terminal_nodes.device)

    def user_log_flows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-user log flows of the exact variant: log F_u(n) = log Σ_{i below n} R(i)·s(u, i), s = "mid".

        Returns:
            [B, num_nodes] float64 (−inf for zero flow), on the device of `rows`.
        """
        s = self.item_scores(rows, self._normalization("mid"))  # [B, M]
        log_r = torch.as_tensor(self.tree.item_rewards).log().unsqueeze(0) + s.log()  # [B, M] log R(i) s(u, i)
        return self.tree.log_aggregate_to_nodes(log_r).to(rows.device)  # [B, N] log F_u(n)

    def distilled_flows(self, rows: torch.Tensor) -> DenseUserFlows | TopNUserFlows:
        """Per-user flows of the distill variant for the training rows `rows` [B] (only these rows are read).

        log R_u(i) = α log(R(i) + ε) + β log softmax(logits_u / τ)_i, pushed through the tree (dense, or top-n).
        """
        if self.distill is None:
            raise ValueError(f"distilled flows need variant='distill', this model has variant={self.variant!r}")
        idx = self._row_indices(rows)
        logits = self.preference_scores[idx]  # [B, M] only the batch rows (a memory map stays on disk)
        return self.distill.user_flows(self.tree, self._log_weights, self._base_log_flows, logits)

    def _flow_table(
        self, rows: torch.Tensor | None, batch: int, device: torch.device
    ) -> DenseUserFlows | TopNUserFlows | None:
        """Per-user flows for `exact` and `distill`, else None (the tree's flows apply)."""
        if self.variant not in ("exact", "distill"):
            return None
        if rows is None:
            raise ValueError(
                f"variant={self.variant!r} needs `rows` (the training row of each sample) to build per-user flows"
            )
        rows = torch.as_tensor(rows, device=device).reshape(-1)
        if rows.numel() != batch:
            raise ValueError(f"`rows` must have one entry per sample ({batch}), got {rows.numel()}")
        if self.variant == "distill":
            return self.distilled_flows(rows)
        return DenseUserFlows(self.user_log_flows(rows))

    def _log_flows(self, nodes: torch.Tensor, table: DenseUserFlows | TopNUserFlows | None) -> torch.Tensor:
        """log F at `nodes` [B, ...] (tree flows, or row b's per-user flows); −inf at -1."""
        if table is None:
            return self.tree.log_flows(nodes)
        return table.log_flows(nodes).to(nodes.device)

    def _variant_scores(self, rows: torch.Tensor | None, terminal_nodes: torch.Tensor) -> torch.Tensor:
        """s_b [B] of the div_s / add_logs variants (1 otherwise)."""
        B = terminal_nodes.shape[0]
        if self.variant not in ("div_s", "add_logs"):
            return torch.ones(B, dtype=torch.float64, device=terminal_nodes.device)
        if rows is None:
            raise ValueError(f"variant={self.variant!r} needs `rows` (the training row of each sample) to look up s")
        rows = torch.as_tensor(rows).reshape(-1)
        if rows.numel() != B:
            raise ValueError(f"`rows` must have one entry per sample ({B}), got {rows.numel()}")
        method = self._normalization("mid" if self.variant == "div_s" else "minmax")
        return self.terminal_scores(self.item_scores(rows, method), terminal_nodes)  # [B]

    def _personalize(self, log_r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Apply div_s / add_logs to log rewards [B, ...] with per-row scores s [B]."""
        s = s.reshape(-1, *([1] * (log_r.dim() - 1)))  # [B, 1, ...]
        if self.variant == "div_s":
            return log_r / s
        if self.variant == "add_logs":
            return log_r + torch.log(s + LOG_EPS)
        return log_r

    # ------------------------------------------------------------------ token-level targets

    def _walk(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_b [B], path nodes [B, T+2] after 0 … T+1 tokens, terminal node [B]) of right-padded rows [B, L]."""
        B, L = ids.shape
        is_term = ids == self.tree.terminator_id  # [B, L]
        has_term = is_term.any(dim=1)  # [B]
        lengths = torch.where(has_term, is_term.int().argmax(dim=1), torch.full_like(has_term, L, dtype=torch.long))
        T = int(lengths.max()) if B else 0
        tokens = torch.full((B, T + 1), INVALID, dtype=torch.long, device=ids.device)  # [B, T+1]
        width = min(L, T + 1)
        tokens[:, :width] = ids[:, :width]
        k = torch.arange(T + 1, device=ids.device)  # [T+1]
        tokens = torch.where(k.unsqueeze(0) <= lengths.unsqueeze(1), tokens, INVALID)  # cut after the terminator
        path = self.tree.walk(tokens)  # [B, T+2]
        terminal = path.gather(1, (lengths + 1).unsqueeze(1)).squeeze(1)  # [B]
        terminal = torch.where(has_term, terminal, torch.full_like(terminal, INVALID))
        return lengths, path, terminal

    def token_targets(self, completion_ids: torch.Tensor, rows: torch.Tensor | None = None) -> TokenTargets:
        """Token-level targets for :func:`trl_flower.losses.flower_subtb_loss` on sampled item paths.

        For row b with t = t_b title tokens and states s_0 … s_t (variant-adjusted as in the module docstring)::

            log_reward[b, k]      = ℓ_k = log F(s_{k+1}) − log F(s_k)          k < t
            log_term_target[b, k] = nonterminal_log_term                       k < t
            log_term_target[b, t] = log R(y) − log F(s_t)

        Args:
            completion_ids: LongTensor [B, L], each row an item path ending with the terminator, right-padded with
                any id (everything after the first terminator is ignored).
            rows: LongTensor [B], the `preference_scores` row of each sample (needed by div_s, add_logs, exact).

        Returns:
            :class:`TokenTargets`; rows that are not complete positive-reward paths have ``valid = False`` and
            finite placeholder targets (−15, see the module docstring).
        """
        ids = torch.as_tensor(completion_ids)
        if ids.dim() != 2:
            raise ValueError(f"`completion_ids` must be [B, L], got shape {tuple(ids.shape)}")
        ids = ids.long()
        B = ids.shape[0]
        lengths, path, terminal = self._walk(ids)  # [B], [B, T+2], [B]
        T = path.shape[1] - 2
        k = torch.arange(T + 1, device=ids.device)  # [T+1]
        on_path = k.unsqueeze(0) <= lengths.unsqueeze(1)  # [B, T+1] states s_0 … s_t
        nodes = torch.where(on_path, path[:, : T + 1], INVALID)  # [B, T+1]

        table = self._flow_table(rows, B, ids.device)  # [B, N] or None
        log_f = self._log_flows(nodes, table)  # [B, T+1] log F(s_k)
        log_f_end = log_f.gather(1, lengths.clamp(max=T).unsqueeze(1)).squeeze(1)  # [B] log F(s_t)
        log_r_term = self._log_flows(terminal.unsqueeze(1), table).squeeze(1)  # [B] log R(y) (per user for exact)
        complete = terminal >= 0  # [B]
        valid = complete & torch.isfinite(log_r_term)  # [B]

        s = self._variant_scores(rows, terminal)  # [B] (1 for incomplete rows)
        ell = self._personalize(log_f[:, 1:] - log_f[:, :-1], s)  # [B, T]
        term = self._personalize(log_r_term - log_f_end, s)  # [B]

        title_mask = on_path[:, 1:]  # [B, T]: token k is a title token iff k < t_b
        # from the first non-finite ℓ on (wrong token, zero flow) the official constant −15 replaces ℓ
        bad = (~torch.isfinite(ell) & title_mask).cummax(dim=1).values  # [B, T]
        ell = torch.where(bad, INVALID_LOG_REWARD, ell)
        log_reward = torch.where(title_mask, ell, 0.0)  # [B, T]
        term = torch.where(valid, term, self.nonterminal_log_term)  # [B]
        log_term = torch.where(k.unsqueeze(0) < lengths.unsqueeze(1), self.nonterminal_log_term, 0.0)  # [B, T+1]
        if self.title_log_term == "flow":
            # states before the end that are complete titles themselves get their own log R(s)/F(s)
            end_here = self.tree.advance(nodes, torch.full_like(nodes, self.tree.terminator_id))  # [B, T+1]
            own = self._personalize(self._log_flows(end_here, table) - log_f, s)  # [B, T+1]
            is_title = torch.isfinite(own) & (k.unsqueeze(0) < lengths.unsqueeze(1)) & valid.unsqueeze(1)
            log_term = torch.where(is_title, own, log_term.to(own.dtype))  # [B, T+1]
        log_term = log_term.to(torch.float64).scatter(1, lengths.clamp(max=T).unsqueeze(1), term.unsqueeze(1))
        log_term = torch.where(on_path, log_term, 0.0)  # [B, T+1]
        return TokenTargets(
            lengths=lengths,
            log_reward=log_reward.to(torch.float64),
            log_term_target=log_term,
            valid=valid,
            complete=complete,
            terminal_nodes=terminal,
            item_ids=self.tree.terminal_item(terminal),
            nodes=nodes,
            scores=s,
        )

    def child_targets(
        self,
        nodes: torch.Tensor,
        rows: torch.Tensor | None = None,
        terminal_nodes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Process-reward distributions over *all* children of visited states, for the full-distribution loss.

        For state n with children c (the terminator among them when n is a complete title)::

            none, add_logs: log r(c|n) = log F(c) − log F(n)   (add_logs adds log s_b to every child: it cancels)
            div_s:          log_softmax_c( (log F(c) − log F(n)) / s_b )
            exact:          log F_u(c) − log F_u(n)            (per-user flows of row b)

        each log-normalised over the children; zero-flow children get −inf, and a zero-flow (or -1) state has no
        distribution: all its entries are −inf.

        Args:
            nodes: [B, S] node ids (e.g. ``TokenTargets.nodes``), -1 for padding.
            rows: [B] `preference_scores` rows (exact and div_s).
            terminal_nodes: [B] terminal node of each row's sampled title (div_s: gives s_b;
                ``TokenTargets.terminal_nodes``).

        Returns:
            child_tokens [B, S, K] (-1 padding), child_log_rewards [B, S, K] float64 (−inf padding),
            child_mask [B, S, K] bool (real children).
        """
        B, S = nodes.shape
        tok, child, mask = self.tree.children(nodes.reshape(-1))  # [B*S, K] each
        K = tok.shape[1]
        tok, child, mask = (x.reshape(B, S, K) for x in (tok, child, mask))  # [B, S, K]
        table = self._flow_table(rows, B, nodes.device)  # [B, N] or None
        log_r = self._log_flows(child, table) - self._log_flows(nodes, table).unsqueeze(-1)  # [B, S, K]
        if self.variant == "div_s":
            if terminal_nodes is None:
                raise ValueError("variant='div_s' needs `terminal_nodes` (the sampled title of each row gives s_b)")
            log_r = self._personalize(log_r, self._variant_scores(rows, terminal_nodes))
        log_r = torch.where(mask & ~log_r.isnan(), log_r, float("-inf"))  # [B, S, K] (0/0 below a zero-flow state)
        log_r = log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)  # [B, S, K] normalised over the children
        log_r = torch.where(log_r.isnan(), float("-inf"), log_r)  # rows without a distribution: −inf − (−inf)
        return tok, log_r, mask

    # ------------------------------------------------------------------ TRL reward-function protocol

    def _completion_token_ids(self, completions: list, completion_ids: Any) -> list[list[int]]:
        """Token paths per completion, cut after the first terminator."""
        term = self.tree.terminator_id
        if completion_ids is not None:
            out = []
            for ids in completion_ids:
                ids = [int(t) for t in ids]
                out.append(ids[: ids.index(term) + 1] if term in ids else ids)
            return out
        if self.tokenizer is None:
            raise ValueError(
                "PrefixTreeRewardModel got text completions without `completion_ids`; pass `tokenizer=` at "
                "construction so that completions can be tokenised exactly like the tree's titles."
            )
        texts = []
        for c in completions:
            text = c if isinstance(c, str) else "".join(m["content"] for m in c)  # chat form: list of messages
            term_text = self.tokenizer.decode([term])
            if term_text and term_text in text:  # a regular-token terminator (e.g. "\n") is part of the text
                text = text[: text.index(term_text)]
            texts.append(text)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) + [term] for ids in encoded]

    def __call__(
        self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None, **kwargs
    ) -> list[float]:
        """One scalar reward per completion (TRL's `reward_funcs` protocol, as used by GRPO/RLOO).

        The title y of a completion is found by walking the tree along its tokens up to the first terminator.
        The reward depends on `sequence_reward`, with R(y) the title's reward (summed over duplicate ids)::

            "minmax":    (R(y) − min R) / (max R − min R)   min/max over the catalogue's titles (1 if all equal)
            "log_share": log R(y) / Z
            "raw":       R(y)

        Personalised when the model has `preference_scores` (then ``kwargs[row_column]`` is required): with s the
        title's score for the prompt's row (reward-weighted mean over duplicate ids),

            "minmax":    minmax(R(y)) · s_minmax(u, y)     with uniform R this is exactly the paper's PPO reward
                                                           (min-max-normalised SASRec softmax score of the row)
            "raw":       R(y) · s_mid(u, y)                the exact variant's per-user reward
            "log_share": log R(y) s_mid(u, y) / Z_u,  Z_u = Σ_i R(i) s_mid(u, i)

        (`score_normalization` overrides the normalisation). Completions that are not a catalogue title get
        `invalid_reward`; under "log_share" so do zero-reward titles (log 0).

        Args:
            prompts: the prompts (only their number is used).
            completions: generated texts, or chat-form lists ``[{"role": "assistant", "content": ...}]``; tokenised
                with `tokenizer` (no special tokens, cut at the terminator's text, terminator appended) when
                `completion_ids` is None.
            completion_ids: token ids per completion (TRL passes them cut after the first EOS); preferred.
            **kwargs: what TRL adds: every other dataset column as a list with one entry per completion (e.g.
                ``row_index``, read through `row_column` for personalisation), plus ``trainer_state``,
                ``log_extra``, ``log_metric`` and others; everything not needed here is ignored.

        Returns:
            A list of ``len(completions)`` Python floats.

        Example:
            >>> tree = PrefixTree.from_token_paths([[5, 6, 2], [5, 2], [7, 2]], terminator_id=2, item_rewards=[3, 1, 4])
            >>> reward = PrefixTreeRewardModel(tree)
            >>> reward(prompts=["p"] * 3, completions=["", "", ""], completion_ids=[[5, 6, 2], [7, 2], [6, 2]])
            [0.6666666666666666, 1.0, 0.0]
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        paths = self._completion_token_ids(completions, completion_ids)
        B = len(paths)
        if B == 0:
            return []
        L = max(len(p) for p in paths)
        ids = torch.full((B, max(L, 1)), INVALID, dtype=torch.long)  # [B, L] padded with -1 (never a child)
        for b, p in enumerate(paths):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        _, _, terminal = self._walk(ids)  # [B]
        complete = terminal >= 0  # [B]
        log_R = torch.as_tensor(self.node_log_reward)[terminal.clamp(min=0)]  # [B] log R(y), in log space

        personal = self.preference_scores is not None
        if personal:
            if self.row_column not in kwargs:
                raise ValueError(
                    f"this reward model personalises with `preference_scores` but TRL passed no {self.row_column!r} "
                    f"column (got {sorted(kwargs)}); keep the column in the dataset (remove_unused_columns=False) "
                    "or set `row_column`."
                )
            rows = torch.as_tensor([int(r) for r in kwargs[self.row_column]], dtype=torch.long)  # [B]

        if self.distill is not None:  # per-user flows: R_u(y) at the title's terminal node, Z_u at the root
            flows = self.distilled_flows(rows)
            log_ru = flows.log_flows(terminal.unsqueeze(1)).squeeze(1)  # [B] (−inf for incomplete rows)
            if self.sequence_reward == "raw":
                value = log_ru.exp()
            else:  # log_share
                value = log_ru - flows.log_flows(torch.zeros(B, 1, dtype=torch.long)).squeeze(1)
                complete = complete & torch.isfinite(value)
        elif self.sequence_reward == "minmax":
            lo, hi = self._log_reward_lo, self._log_reward_hi
            if hi == lo:
                value = torch.ones_like(log_R)
            elif np.isfinite(np.exp(hi)):  # (R − lo) / (hi − lo) on the plain sums (exact)
                R = torch.as_tensor(self.node_reward)[terminal.clamp(min=0)]  # [B]
                value = (R - np.exp(lo)) / (np.exp(hi) - np.exp(lo))
            else:  # the same, scaled by hi: rewards near the float64 maximum would overflow
                value = (log_R - hi).exp().sub(np.exp(lo - hi)).div(-np.expm1(lo - hi))
            if personal:
                value = value * self.terminal_scores(self.item_scores(rows, self._normalization("minmax")), terminal)
        else:
            log_s = torch.zeros_like(log_R)
            if personal:
                s_item = self.item_scores(rows, self._normalization("mid"))  # [B, M]
                log_s = self.terminal_scores(s_item, terminal).log()  # [B]
            if self.sequence_reward == "raw":
                R = torch.as_tensor(self.node_reward)[terminal.clamp(min=0)]  # [B] R(y) exactly (no exp(log))
                value = R * log_s.exp() if personal else R
            else:  # log_share
                log_z = float(self.node_log_reward[0])
                if personal:  # Z_u = Σ_i R(i) s(u, i), in log space
                    log_items = torch.as_tensor(self.tree.item_rewards).log().unsqueeze(0) + s_item.log()  # [B, M]
                    log_z = torch.logsumexp(log_items, dim=1)  # [B]
                value = log_R + log_s - log_z
                complete = complete & torch.isfinite(value)
        value = torch.where(complete, value, self.invalid_reward)  # [B]
        return [float(v) for v in value]

    def __repr__(self) -> str:
        return (
            f"PrefixTreeRewardModel(variant={self.variant!r}, sequence_reward={self.sequence_reward!r}, "
            f"personalised={self.preference_scores is not None}, tree={self.tree!r})"
        )


def _reward_array(item_rewards, tree: PrefixTree) -> np.ndarray:
    """R(i) as a float64 array [num_items] from None (the tree's), an array, or a mapping {item_id: reward}."""
    if item_rewards is None:
        return tree.item_rewards
    if isinstance(item_rewards, Mapping):
        out = np.zeros(tree.num_items, dtype=np.float64)
        ids = np.fromiter((int(i) for i in item_rewards), dtype=np.int64, count=len(item_rewards))
        bad = ids[(ids < 0) | (ids >= tree.num_items)]
        if bad.size:
            raise ValueError(f"item_rewards has item id {int(bad[0])} outside the tree's 0 .. {tree.num_items - 1}")
        out[ids] = np.fromiter((float(v) for v in item_rewards.values()), dtype=np.float64, count=len(item_rewards))
        return out
    return np.asarray(item_rewards, dtype=np.float64)
