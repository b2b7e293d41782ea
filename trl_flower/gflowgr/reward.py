r"""GFlowGR reward model: interaction level + estimated score + code overlap, fused by a sum or learnable weights.

For row b and sampled item j (column 0 = the positive v) the terminal reward is built from three signals:

* **interaction level** r_a: ``reward_positive`` for v, ``reward_logged`` for an item of the user's history/session,
  ``reward_unobserved`` otherwise. The paper's example values are liked = 10, clicked = 1, unpresented = 0; those are
  the defaults here (on the Amazon splits every observed interaction is one review, so "logged" = a history item).
* **estimated score** r_ŷ ∈ (0, 1], max-normalised so the best item of the row scores 1:

  - ``score_source="cm"``: collaborative-model row logits s (e.g. SASRec ``score_rows``): r_ŷ = softmax(s)_j /
    max softmax(s) = exp(s_j − max_i s_i), the softmax over the whole catalogue per row, normalised by its max;
  - ``score_source="model"``: the GR model's own trajectory probabilities over the sampled set,
    r_ŷ = exp(log P(τ_j) − max_k log P(τ_k)) (detached; the "LLM reward" variant, no extra inference);
  - ``score_source="none"``: r_ŷ = 0.
* **code overlap** r_sim = Σ_{l ≤ L} 𝟙(c_l(item) = c_l(v)), position-wise matches of the L semantic codes with the
  positive's (r_sim(v) = L; the collision level is excluded since its value is arbitrary). Option
  ``similarity="prefix"`` (ours) counts only the matches of the shared prefix.

Fusion: ``"sum"`` (paper default) R = r_a + r_ŷ + r_sim; ``"weighted"`` R = Σ_k softplus(w_k) r_k with learnable
w (initialised so every weight is 1, i.e. starting from the sum). Every signal is ≥ 0, and

    log R = log(R + ε),   ε = ``epsilon`` (default 1e-3),

keeps log R finite for an unobserved item with no overlap and a negligible score (the paper does not say how it
keeps R > 0; this ε is ours). With ``"weighted"`` the gradient of the GFlowNet loss reaches w through log R.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FUSIONS", "GFlowGRReward", "INTERACTION_LEVELS", "SCORE_SOURCES", "SIMILARITIES", "interaction_levels"]

FUSIONS = ("sum", "weighted")
SCORE_SOURCES = ("cm", "model", "none")
SIMILARITIES = ("position", "prefix")
INTERACTION_LEVELS = ("positive", "logged", "unobserved")  # codes 0, 1, 2


def interaction_levels(items: torch.Tensor, positives: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
    """int64 [B, K]: 0 = the positive, 1 = in the history (-1 padded [B, H]), 2 = unobserved."""
    is_pos = items == positives[:, None]  # [B, K]
    in_hist = ((items[:, :, None] == histories[:, None, :]) & (histories[:, None, :] >= 0)).any(-1)  # [B, K]
    return torch.where(is_pos, 0, torch.where(in_hist, 1, 2))


class GFlowGRReward(nn.Module):
    """Terminal log-rewards of sampled items (see the module docstring for the math).

    Args:
        codes: int64 [num_items, ≥ L] item codes (``SemanticIDs.codes``); only the first `num_levels` columns count.
        num_levels: L, the semantic levels compared by r_sim (default: all columns but the last).
        reward_positive, reward_logged, reward_unobserved: r_a per interaction level (≥ 0).
        score_source: ``"cm"``, ``"model"`` or ``"none"``.
        fusion: ``"sum"`` or ``"weighted"`` (learnable softplus weights over (r_a, r_ŷ, r_sim)).
        epsilon: ε > 0 added before the log.
        similarity: ``"position"`` (the paper's Σ_l 𝟙(c_l = c'_l)) or ``"prefix"`` (ours: the length of the shared code
            prefix, so a deep-level match without the levels above it, which is meaningless for residual codes,
            earns nothing).

    Example:
        >>> codes = torch.tensor([[0, 1, 0], [0, 2, 0], [1, 2, 0]])
        >>> rm = GFlowGRReward(codes, score_source="none")
        >>> log_r, parts = rm(torch.tensor([[0, 1, 2]]), torch.tensor([0]), torch.tensor([[2]]))
        >>> parts["reward"].tolist()  # 10 + 2 matches; 0 + 1 match; 1 (logged) + 0 matches
        [[12.0, 1.0, 1.0]]
    """

    def __init__(
        self,
        codes: torch.Tensor,
        num_levels: int | None = None,
        reward_positive: float = 10.0,
        reward_logged: float = 1.0,
        reward_unobserved: float = 0.0,
        score_source: str = "cm",
        fusion: str = "sum",
        epsilon: float = 1e-3,
        similarity: str = "position",
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"`similarity` must be one of {SIMILARITIES}, got {similarity!r}")
        if score_source not in SCORE_SOURCES:
            raise ValueError(f"`score_source` must be one of {SCORE_SOURCES}, got {score_source!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"`fusion` must be one of {FUSIONS}, got {fusion!r}")
        levels = (reward_positive, reward_logged, reward_unobserved)
        if min(levels) < 0 or not all(math.isfinite(v) for v in levels):
            raise ValueError(f"interaction rewards must be finite and >= 0 (R must stay > 0), got {levels}")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0 so that log R stays finite, got {epsilon}")
        codes = torch.as_tensor(codes, dtype=torch.long)
        L = codes.shape[1] - 1 if num_levels is None else num_levels
        if not 1 <= L <= codes.shape[1]:
            raise ValueError(f"`num_levels` must be in [1, {codes.shape[1]}], got {L}")
        self.register_buffer("codes", codes[:, :L].clone(), persistent=False)  # [M, L]
        self.register_buffer("level_rewards", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.score_source, self.fusion, self.epsilon = score_source, fusion, float(epsilon)
        self.similarity = similarity
        # softplus(log(e − 1)) = 1: the weighted fusion starts as the plain sum
        self.raw_weights = nn.Parameter(torch.full((3,), math.log(math.e - 1))) if fusion == "weighted" else None

    def weights(self) -> torch.Tensor:
        """Fusion weights over (r_a, r_ŷ, r_sim): ones for ``sum``, softplus(w) for ``weighted``."""
        if self.raw_weights is None:
            return self.level_rewards.new_ones(3)
        return nn.functional.softplus(self.raw_weights)

    def forward(
        self,
        items: torch.Tensor,
        positives: torch.Tensor,
        histories: torch.Tensor,
        scores: torch.Tensor | None = None,
        traj_log_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """log R [B, K] of each sampled item and the parts {"r_a", "r_score", "r_sim", "reward"} (each [B, K]).

        Args:
            items: int64 [B, K] sampled item ids (column 0 is normally the positive).
            positives: int64 [B].
            histories: int64 [B, H], -1 padded.
            scores: [B, num_items] CM row logits (``score_source="cm"``).
            traj_log_probs: [B, K] log P_GR(τ) of the sampled trajectories (``score_source="model"``; detached here).
        """
        device = self.codes.device
        items, positives, histories = items.to(device), positives.to(device), histories.to(device)
        r_a = self.level_rewards[interaction_levels(items, positives, histories)]  # [B, K]
        if self.score_source == "cm":
            if scores is None:
                raise ValueError("score_source='cm' needs `scores` [B, num_items] (collaborative-model row logits)")
            s = scores.to(device=device, dtype=torch.float32)
            r_score = (s.gather(1, items) - s.max(dim=1, keepdim=True).values).exp()  # [B, K] ∈ (0, 1]
        elif self.score_source == "model":
            if traj_log_probs is None:
                raise ValueError("score_source='model' needs `traj_log_probs` [B, K]")
            lp = traj_log_probs.detach().to(device=device, dtype=torch.float32)
            r_score = (lp - lp.max(dim=1, keepdim=True).values).exp()  # [B, K] ∈ (0, 1]
        else:
            r_score = torch.zeros_like(r_a)
        match = self.codes[items] == self.codes[positives][:, None, :]  # [B, K, L]
        if self.similarity == "prefix":  # only matches inside the shared prefix count (RQ codes are nested)
            match = match.long().cumprod(-1).bool()
        r_sim = match.sum(-1).to(r_a.dtype)  # [B, K]
        w = self.weights()
        reward = w[0] * r_a + w[1] * r_score + w[2] * r_sim  # [B, K] ≥ 0
        parts = {"r_a": r_a, "r_score": r_score, "r_sim": r_sim, "reward": reward}
        return torch.log(reward + self.epsilon), parts
