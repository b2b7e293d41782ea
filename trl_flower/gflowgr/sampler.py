r"""GFlowGR trajectory sampler: the positive item plus N augmented items per training row.

For a training row (prompt U, positive v, history H) the sampler returns N + 1 item ids; column 0 is always v (τ_1 in
the paper), columns 1 … N are the augmented trajectories. ``num_augmented`` = N counts augmented items only, so the
paper's sensitivity grid "N ∈ {0, 1, 3, 5}" maps to ``num_augmented`` = N (N = 0: SFT + TB on the positive alone).

Strategies (paper §"trajectory sampler"; one per run, not a mixture):

* ``logs``: items of the user's own history/session (uniform without replacement); rows with fewer than N usable
  history items are topped up with random unobserved items.
* ``random``: uniform over unobserved items (not the positive, not in the history), without replacement.
* ``curriculum`` (the paper's default): a collaborative model (CM, e.g. SASRec row logits) ranks the unobserved items
  of each row by score, descending. A window of W = ``curriculum_window`` consecutive ranks (default 2N, the
  reproducer's "score a pool of about 2N items") slides linearly with the training progress p ∈ [0, 1]::

      start(p) = round((1 − p) · (n_cand − W)),   window = ranks [start(p), start(p) + W)

  so at p = 0 the window holds the W *lowest*-scored items (easy negatives) and at p = 1 the W *highest*-scored ones
  (hard negatives, closest to the user's taste); N items are drawn uniformly from the window. The schedule itself is
  not in the paper (NOT FOUND there); this linear one is ours.
* ``beam``: the model's own constrained beam search top items (on-policy, error-aware), in beam order, skipping the
  positive; topped up with random unobserved items when the beam returns fewer than N others.

All strategies are vectorised over the batch (one [B, num_items] key matrix and one ``topk``) and seeded by a private
``torch.Generator``. If a catalogue is too small to provide N unobserved items, history items and then the positive
fill the remaining slots (never silently fewer than N + 1 columns).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["STRATEGIES", "TrajectorySampler", "pad_histories"]

STRATEGIES = ("logs", "random", "curriculum", "beam")


def pad_histories(histories: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pad item-id histories to an int64 [B, H] tensor with -1 (H ≥ 1)."""
    H = max([len(h) for h in histories] + [1])
    out = torch.full((len(histories), H), -1, dtype=torch.long)
    for b, h in enumerate(histories):
        if len(h):
            out[b, : len(h)] = torch.as_tensor(list(h), dtype=torch.long)
    return out.to(device)


class TrajectorySampler:
    """Draw N augmented items per positive with one of :data:`STRATEGIES`.

    Args:
        num_items: catalogue size M (item ids 0 … M−1).
        num_augmented: N ≥ 0, augmented items per row (paper default 3).
        strategy: ``"logs"``, ``"random"``, ``"curriculum"`` or ``"beam"``.
        seed: seed of the private generator.
        curriculum_window: W for ``curriculum`` (default 2N, at least N).

    Example:
        >>> s = TrajectorySampler(num_items=10, num_augmented=2, strategy="logs", seed=0)
        >>> out = s.sample(torch.tensor([4]), torch.tensor([[1, 2, -1]]))
        >>> out[0, 0].item(), sorted(out[0, 1:].tolist())
        (4, [1, 2])
    """

    def __init__(
        self,
        num_items: int,
        num_augmented: int = 3,
        strategy: str = "curriculum",
        seed: int = 0,
        curriculum_window: int | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
        if num_augmented < 0:
            raise ValueError(f"`num_augmented` must be >= 0 (augmented items per positive), got {num_augmented}")
        if num_items < 1:
            raise ValueError(f"`num_items` must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.num_augmented = int(num_augmented)
        self.strategy = strategy
        self.window = int(curriculum_window) if curriculum_window is not None else 2 * self.num_augmented
        if self.window < self.num_augmented:
            raise ValueError(f"`curriculum_window` ({self.window}) must be >= num_augmented ({num_augmented})")
        self.generator = torch.Generator().manual_seed(seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def _base_keys(self, positives: torch.Tensor, histories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random keys [B, M]: unobserved ∈ [0, 1), history ∈ [−2, −1) (fallback), positive −3; and the history mask."""
        B, M = positives.shape[0], self.num_items
        in_hist = torch.zeros(B, M, dtype=torch.bool)  # [B, M]
        valid = histories >= 0  # [B, H]
        rows = torch.arange(B)[:, None].expand_as(histories)
        in_hist[rows[valid], histories[valid]] = True
        keys = self._rand(B, M)  # [B, M]
        keys = torch.where(in_hist, keys - 2.0, keys)
        keys[torch.arange(B), positives] = -3.0
        return keys, in_hist

    def sample(
        self,
        positives: torch.Tensor,
        histories: torch.Tensor,
        *,
        scores: torch.Tensor | None = None,
        progress: float = 0.0,
        beam_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Item ids [B, N + 1]: column 0 the positive, then N augmented items (distinct within a row).

        Args:
            positives: int64 [B] positive item ids.
            histories: int64 [B, H] history item ids, -1 padded (:func:`pad_histories`).
            scores: [B, M] collaborative-model scores (required by ``curriculum``; higher = more preferred).
            progress: training progress p ∈ [0, 1] (``curriculum`` only).
            beam_items: int64 [B, K] the model's beam-search items in rank order, -1 for none (``beam`` only).
        """
        positives = positives.detach().cpu().long()
        histories = histories.detach().cpu().long()
        B, N = positives.shape[0], self.num_augmented
        if N == 0:
            return positives[:, None]
        keys, in_hist = self._base_keys(positives, histories)  # [B, M]
        if self.strategy == "logs":
            keys = torch.where(in_hist, keys + 4.0, keys)  # history ∈ [2, 3): chosen first
            keys[torch.arange(B), positives] = -3.0
        elif self.strategy == "beam":
            if beam_items is None:
                raise ValueError("strategy 'beam' needs `beam_items` [B, K] (the model's beam-search item ids)")
            beam_items = beam_items.detach().cpu().long()
            K = beam_items.shape[1]
            ok = beam_items >= 0  # [B, K]
            rank_key = 4.0 - torch.arange(K, dtype=keys.dtype) / max(K, 1)  # [K] in (3, 4]: beam order kept
            rows = torch.arange(B)[:, None].expand_as(beam_items)
            keys[rows[ok], beam_items[ok]] = rank_key.expand(B, K)[ok]
            keys[torch.arange(B), positives] = -3.0
        elif self.strategy == "curriculum":
            return torch.cat([positives[:, None], self._curriculum(keys, scores, progress)], dim=1)
        aug = keys.topk(min(N, self.num_items), dim=1).indices  # [B, N]
        return torch.cat([positives[:, None], aug], dim=1)

    def _curriculum(self, keys: torch.Tensor, scores: torch.Tensor | None, progress: float) -> torch.Tensor:
        if scores is None:
            raise ValueError("strategy 'curriculum' needs `scores` [B, num_items] from a collaborative model")
        if scores.shape != keys.shape:
            raise ValueError(f"`scores` must be [B, num_items] = {tuple(keys.shape)}, got {tuple(scores.shape)}")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"`progress` must lie in [0, 1], got {progress}")
        B, M = keys.shape
        N, W = self.num_augmented, min(self.window, M)
        cand = keys >= 0  # [B, M] unobserved
        # rank order: unobserved by CM score descending, then history, then the positive (fallbacks at the end)
        tier = torch.where(cand, 0, torch.where(keys > -3.0, 1, 2))  # [B, M]
        s = torch.nan_to_num(scores.detach().cpu().double(), nan=float("-inf"))  # [B, M]
        by_score = torch.argsort(s, dim=1, descending=True, stable=True)  # [B, M]
        order = by_score.gather(1, torch.argsort(tier.gather(1, by_score), dim=1, stable=True))  # [B, M]
        n_cand = cand.sum(1)  # [B]
        start = ((1.0 - progress) * (n_cand - W).clamp(min=0).double()).round().long()  # [B]
        pick = self._rand(B, W).topk(min(N, W), dim=1).indices  # [B, N] offsets inside the window
        ranks = (start[:, None] + pick).clamp(max=M - 1)  # [B, N]
        return order.gather(1, ranks)
