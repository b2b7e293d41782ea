r"""Item popularity from training histories and the paper's 8 popularity groups (flower_reference.md §1.3, §3.2).

Popularity is counted over the **history lists of the training rows**; targets are not counted (this is the
official ``*_title_interaction_*.json``, which is also the outcome reward R(y) of the GFlowNet). Titles are the unit:
item ids that share a title are merged.

Groups: sort the titles by count, descending, with a *stable* sort (ties keep first-appearance order); cut the list
into G = 8 contiguous groups, the first ``N mod G`` of size :math:`\lfloor N/G \rfloor + 1` and the rest of size
:math:`\lfloor N/G \rfloor`. Group 0 is the most popular. The reference share of group g is its interaction share

.. math::  q_g = \frac{\sum_{y \in \mathcal{G}_g} c(y)}{\sum_y c(y)},

not its share of titles. For CDs_and_Vinyl this gives [0.4292, 0.1707, 0.1181, 0.0909, 0.0712, 0.0564, 0.0413,
0.0221], the values hard-coded as ``gh_genre`` in the official code.

A catalogue title that never appears in a training history belongs to no group; the paper (and this module) counts
it in the least popular group G-1 (CDs: 13 such titles, Movies: 28).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NUM_GROUPS = 8


def history_title_counts(histories: Iterable[Sequence[str]]) -> dict[str, int]:
    """Count every title occurrence in the given history lists.

    Args:
        histories: one list of titles per training row (e.g. ``train["history_item_title"]``).

    Returns:
        title -> count, in order of first appearance (the official ``title_interaction`` file, key order included).
    """
    counts: dict[str, int] = {}
    for history in histories:
        for title in history:
            counts[title] = counts.get(title, 0) + 1
    return counts


def history_item_counts(histories: Iterable[Sequence[int]], num_items: int) -> np.ndarray:
    """Count every item-id occurrence in the given history lists.

    Args:
        histories: one list of item ids per training row (e.g. ``train["history_item_id"]``).
        num_items: catalogue size; ids must lie in ``[0, num_items)``.

    Returns:
        int64 array of shape [num_items]; items never in a history get 0.

    Raises:
        ValueError: an id outside ``[0, num_items)``.
    """
    flat = np.fromiter((i for h in histories for i in h), dtype=np.int64)  # [total history length]
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        bad = flat[(flat < 0) | (flat >= num_items)][0]
        raise ValueError(f"history item id {bad} is outside [0, {num_items}); pass the catalogue size of this data")
    return np.bincount(flat, minlength=num_items).astype(np.int64)


def group_sizes(num_titles: int, num_groups: int = NUM_GROUPS) -> list[int]:
    r"""Sizes of the contiguous groups: :math:`\lfloor N/G \rfloor + 1` for the first ``N mod G``, else
    :math:`\lfloor N/G \rfloor`."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    base, extra = divmod(num_titles, num_groups)
    return [base + 1 if g < extra else base for g in range(num_groups)]


@dataclass(frozen=True)
class PopularityGroups:
    """Titles split into popularity groups, with their interaction shares.

    Attributes:
        title_counts: title -> count in training histories, first-appearance order.
        groups: ``groups[g]`` lists the titles of group g, most popular first; group 0 is the most popular.
        shares: float64 array [G], the interaction share q_g of each group (sums to 1).
        title_to_group: title -> group index, for every title in ``title_counts``.
    """

    title_counts: dict[str, int]
    groups: list[list[str]]
    shares: np.ndarray
    title_to_group: dict[str, int]

    @property
    def num_groups(self) -> int:
        """G, the number of groups."""
        return len(self.groups)

    @property
    def least_popular(self) -> int:
        """Index of the least popular group (G-1): where titles outside every group are counted."""
        return len(self.groups) - 1

    def group_of(self, title: str) -> int:
        """The group of ``title``; a title never seen in a training history is in the least popular group."""
        return self.title_to_group.get(title, self.least_popular)

    def item_groups(self, items: Sequence[str]) -> np.ndarray:
        """Group of every item id, from the catalogue titles in id order.

        Args:
            items: ``items[i]`` is the title of item id i.

        Returns:
            int64 array [len(items)]; items whose title is in no training history get the least popular group.
        """
        return np.array([self.group_of(t) for t in items], dtype=np.int64)


def popularity_groups(title_counts: Mapping[str, int], num_groups: int = NUM_GROUPS) -> PopularityGroups:
    """Split titles into ``num_groups`` popularity groups (stable sort by count, descending; contiguous cuts).

    Args:
        title_counts: title -> count (first-appearance order matters for ties), from `history_title_counts`.
        num_groups: G; the paper uses 8.

    Raises:
        ValueError: no titles, fewer titles than groups, or a negative count.
    """
    if len(title_counts) < num_groups:
        raise ValueError(
            f"{len(title_counts)} titles cannot fill {num_groups} popularity groups; use fewer groups or more data"
        )
    if any(c < 0 for c in title_counts.values()):
        raise ValueError("title counts must be non-negative")
    ranked = sorted(title_counts, key=lambda t: -title_counts[t])  # stable: ties keep first-appearance order
    groups: list[list[str]] = []
    start = 0
    for size in group_sizes(len(ranked), num_groups):
        groups.append(ranked[start : start + size])
        start += size
    totals = np.array([sum(title_counts[t] for t in g) for g in groups], dtype=np.float64)  # [G]
    z = totals.sum()
    if z <= 0:
        raise ValueError("all title counts are zero; popularity shares are undefined")
    title_to_group = {t: g for g, titles in enumerate(groups) for t in titles}
    return PopularityGroups(dict(title_counts), groups, totals / z, title_to_group)


def popularity_from_histories(histories: Iterable[Sequence[str]], num_groups: int = NUM_GROUPS) -> PopularityGroups:
    """`popularity_groups` of `history_title_counts`: pass ``train["history_item_title"]``.

    Example:
        >>> pop = popularity_from_histories([["a", "b"], ["a", "c"], ["a", "b", "d"]], num_groups=2)
        >>> pop.groups, pop.shares.tolist()
        ([['a', 'b'], ['c', 'd']], [0.7142857142857143, 0.2857142857142857])
    """
    return popularity_groups(history_title_counts(histories), num_groups)
