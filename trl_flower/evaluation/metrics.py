r"""Top-K recommendation metrics of the Flower paper (flower_reference.md §3.2), vectorised with numpy.

Inputs are a [U, K] matrix of recommended item titles (U users, K ranked recommendations each, rank 0 first) and the
U target titles. Evaluation is at title level: a recommendation hits when its title equals the target title.

* Accuracy: HR@K and NDCG@K with one relevant item per user (IDCG = 1), all K in one pass (`hr_ndcg_at_k`).
* Popularity fairness: DGU@K and MGU@K, comparing the share of recommended titles per popularity group with the
  group's share of training-history interactions (`group_fairness_at_k`).
* Diversity: word entropy H and the type-token ratio TTR over the words of all recommended titles (`word_diversity`).
* Validity: the number of recommended titles that are not catalogue titles (``invalid``, the official ``CC``) and
  the number of distinct recommended titles (``distinct_titles``, the official ``Title_num``).

`recommendation_metrics` returns all of them in one dict with the paper's names (``NDCG@5``, ``HR@5``, ``DGU@10``,
``MGU@10``, ``H``, ``TTR``, ...).

Note:
    Two official-code behaviours are options, never defaults:

    * ``duplicate_rank="last"``: when the target title occurs twice in one list, the official loop keeps the *last*
      rank (it overwrites on every match); the default uses the first, the usual definition.
    * ``reference_group7_bug=True``: a valid title outside every popularity group should be counted in the least
      popular group (the paper says so); the official code instead *resets* that group's count to 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from trl_flower.data.popularity import PopularityGroups

TOPKS = (1, 3, 5, 10)
DuplicateRank = Literal["first", "last"]

_INVALID = -1  # code of a title that is not in the catalogue
_UNGROUPED = -2  # code of a catalogue title that is in no popularity group


def as_title_matrix(recommended: Sequence[Sequence[str]] | np.ndarray) -> np.ndarray:
    """The recommendations as a [U, K] numpy string array.

    Raises:
        ValueError: not two-dimensional (e.g. lists of different lengths); pad short lists with ``""`` (counted as
            invalid) or cut them to a common K.
    """
    try:
        rec = np.asarray(recommended, dtype=str)  # [U, K]
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"recommendations must be a rectangular [U, K] matrix of titles: {err}") from None
    if rec.ndim != 2 or rec.shape[1] == 0:
        raise ValueError(
            f"recommendations must be a [U, K] matrix of titles with K >= 1, got shape {rec.shape}; give every user "
            "the same number of recommendations (pad with '' if needed; '' counts as invalid)"
        )
    return rec


def _check_ks(ks: Iterable[int], width: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    bad = [k for k in ks if not 1 <= k <= width]
    if bad:
        raise ValueError(f"cut-offs {bad} are outside 1..{width}: the recommendation lists have K = {width} columns")
    return ks


def hit_matrix(recommended: Sequence[Sequence[str]] | np.ndarray, targets: Sequence[str]) -> np.ndarray:
    r"""Boolean [U, K] matrix: ``hits[u, r]`` is True when the title at rank r of user u equals u's target title.

    .. math:: \mathrm{hit}_{u,r} = \mathbb{1}[\hat y_{u,r} = y_u]
    """
    rec = as_title_matrix(recommended)  # [U, K]
    tgt = np.asarray(targets, dtype=str)  # [U]
    if tgt.shape != (rec.shape[0],):
        raise ValueError(f"{rec.shape[0]} recommendation lists but {tgt.size} targets; give one target per user")
    return rec == tgt[:, None]  # [U, K]


def hit_ranks(hits: np.ndarray, duplicate_rank: DuplicateRank = "first") -> np.ndarray:
    r"""The 0-based rank of the target in each list, or -1 when it is not in the list.

    .. math:: r_u = \min\{r : \mathrm{hit}_{u,r}\} \quad (\text{or } \max \text{ with } duplicate\_rank="last")

    Args:
        hits: boolean [U, K] hit matrix (several hits in a row happen when a title is recommended twice).
        duplicate_rank: ``"first"`` (default) uses the first matching rank; ``"last"`` the last one, as the official
            loop does by overwriting.

    Returns:
        int64 array [U].
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2:
        raise ValueError(f"hits must be a [U, K] boolean matrix, got shape {hits.shape}")
    if duplicate_rank not in ("first", "last"):
        raise ValueError(f"duplicate_rank must be 'first' or 'last', got {duplicate_rank!r}")
    any_hit = hits.any(axis=1)  # [U]
    if duplicate_rank == "first":
        rank = hits.argmax(axis=1)  # [U] first True
    else:
        rank = hits.shape[1] - 1 - hits[:, ::-1].argmax(axis=1)  # [U] last True
    return np.where(any_hit, rank, -1).astype(np.int64)


def hr_ndcg_at_k(
    hits: np.ndarray, ks: Iterable[int] = TOPKS, duplicate_rank: DuplicateRank = "first"
) -> dict[str, float]:
    r"""HR@K and NDCG@K for every K in ``ks``, in one pass over a [U, K] hit matrix.

    With one relevant item per user the ideal DCG is 1, so for the 0-based target rank :math:`r_u`

    .. math::
        \mathrm{HR@K} = \frac{1}{U}\sum_{u=1}^{U} \mathbb{1}[r_u < K], \qquad
        \mathrm{NDCG@K} = \frac{1}{U}\sum_{u=1}^{U} \frac{\mathbb{1}[r_u < K]}{\log_2(r_u + 2)}.

    Args:
        hits: boolean [U, K_max] hit matrix (`hit_matrix`).
        ks: the cut-offs, each in 1..K_max.
        duplicate_rank: see `hit_ranks`.

    Returns:
        ``{"HR@1": ..., "NDCG@1": ..., "HR@3": ...}`` in the order of ``ks``.
    """
    ranks = hit_ranks(hits, duplicate_rank)  # [U]
    ks = _check_ks(ks, np.asarray(hits).shape[1])
    found = ranks >= 0  # [U]
    gain = np.where(found, 1.0 / np.log2(np.where(found, ranks, 0) + 2.0), 0.0)  # [U]
    within = found[:, None] & (ranks[:, None] < np.asarray(ks)[None, :])  # [U, len(ks)]
    hr = within.mean(axis=0)  # [len(ks)]
    ndcg = (within * gain[:, None]).mean(axis=0)  # [len(ks)]
    out: dict[str, float] = {}
    for i, k in enumerate(ks):
        out[f"HR@{k}"] = float(hr[i])
        out[f"NDCG@{k}"] = float(ndcg[i])
    return out


def _title_codes(rec: np.ndarray, popularity: PopularityGroups, catalogue: set[str]) -> np.ndarray:
    """Group code of every recommended title: 0..G-1, `_UNGROUPED` (valid, no group) or `_INVALID`. Shape of rec."""
    unique, inverse = np.unique(rec, return_inverse=True)  # [V], [U*K]
    code_of_unique = np.array(
        [popularity.title_to_group.get(t, _UNGROUPED) if t in catalogue else _INVALID for t in unique.tolist()],
        dtype=np.int64,
    )  # [V]
    return code_of_unique[inverse.reshape(-1)].reshape(rec.shape)  # [U, K]


def _group_counts(codes: np.ndarray, num_groups: int, reference_group7_bug: bool) -> np.ndarray:
    """Recommended titles per group, float64 [G], from the flat row-major codes of one cut-off."""
    flat = codes.reshape(-1)  # [U*K], user-major: the order of the official loop
    least = num_groups - 1
    if not reference_group7_bug:
        grouped = np.where(flat == _UNGROUPED, least, flat)  # paper: ungrouped catalogue titles -> least popular
        return np.bincount(grouped[grouped >= 0], minlength=num_groups).astype(np.float64)
    counts = np.bincount(flat[flat >= 0], minlength=num_groups).astype(np.float64)
    ungrouped = np.flatnonzero(flat == _UNGROUPED)
    if ungrouped.size:  # official code: `group_num['7'] = 1` at each such title, so only the last reset survives
        last = ungrouped[-1]
        counts[least] = 1.0 + np.count_nonzero(flat[last + 1 :] == least)
    return counts


def group_fairness_at_k(
    recommended: Sequence[Sequence[str]] | np.ndarray,
    popularity: PopularityGroups,
    catalogue: Iterable[str],
    ks: Iterable[int] = (10,),
    reference_group7_bug: bool = False,
) -> dict[str, float | list[float]]:
    r"""DGU@K and MGU@K: how far the recommendations' popularity-group shares are from the data's.

    For the top-K titles of every user, :math:`p_g` is the share of recommended titles that fall in group g, among all
    valid recommended titles (U·K minus invalid ones); :math:`q_g` is group g's share of training-history
    interactions (`PopularityGroups.shares`). With G groups,

    .. math::
        \mathrm{DGU@K} = \max_g (p_g - q_g) - \min_g (p_g - q_g), \qquad
        \mathrm{MGU@K} = \frac{1}{G} \sum_{g=1}^{G} \lvert p_g - q_g \rvert.

    A catalogue title that is in no group counts in the least popular group G-1 (paper). Titles outside the
    catalogue are left out of p. If no valid title is recommended, p is undefined and the metrics are NaN.

    Args:
        recommended: [U, K_max] titles, rank 0 first.
        popularity: the groups and their shares q (`trl_flower.data.popularity.popularity_from_histories`).
        catalogue: all item titles (validity).
        ks: the cut-offs K.
        reference_group7_bug: reproduce the official reset ``group_num['7'] = 1`` instead of counting (not the
            paper's definition; for comparisons with the published code only).

    Returns:
        ``{"DGU@K": ..., "MGU@K": ..., "group_shares@K": [p_0, ..., p_{G-1}]}`` for each K.
    """
    rec = as_title_matrix(recommended)  # [U, K_max]
    ks = _check_ks(ks, rec.shape[1])
    codes = _title_codes(rec, popularity, set(catalogue))  # [U, K_max]
    q = np.asarray(popularity.shares, dtype=np.float64)  # [G]
    out: dict[str, float | list[float]] = {}
    for k in ks:
        counts = _group_counts(codes[:, :k], popularity.num_groups, reference_group7_bug)  # [G]
        total = counts.sum()
        p = counts / total if total > 0 else np.full_like(q, np.nan)  # [G]
        diff = p - q  # [G]
        out[f"DGU@{k}"] = float(diff.max() - diff.min())
        out[f"MGU@{k}"] = float(np.abs(diff).mean())
        out[f"group_shares@{k}"] = p.tolist()
    return out


def word_diversity(titles: Iterable[str]) -> tuple[float, float]:
    r"""Word entropy H (bits) and type-token ratio TTR over the whitespace-split words of all given titles.

    With :math:`f_w` the relative frequency of word w among the N words of all titles and V the number of distinct
    words,

    .. math:: H = -\sum_w f_w \log_2 f_w, \qquad \mathrm{TTR} = V / N.

    Returns:
        ``(H, TTR)``; both NaN when there are no words.
    """
    words = " ".join(np.asarray(list(titles), dtype=str).reshape(-1).tolist()).split()  # = concat of t.split()
    if not words:
        return float("nan"), float("nan")
    _, counts = np.unique(np.asarray(words), return_counts=True)  # [V]
    f = counts / counts.sum()  # [V]
    return float(-(f * np.log2(f)).sum()), float(counts.size / counts.sum())


def invalid_count(recommended: Sequence[Sequence[str]] | np.ndarray, catalogue: Iterable[str]) -> int:
    r"""Number of recommended titles (over all U·K slots) that are not catalogue titles (official ``CC``).

    .. math:: \mathrm{invalid} = \sum_{u,r} \mathbb{1}[\hat y_{u,r} \notin \mathcal{I}]
    """
    rec = as_title_matrix(recommended)
    unique, counts = np.unique(rec, return_counts=True)
    known = set(catalogue)
    return int(sum(c for t, c in zip(unique.tolist(), counts.tolist()) if t not in known))


def recommendation_metrics(
    recommended: Sequence[Sequence[str]] | np.ndarray,
    targets: Sequence[str],
    popularity: PopularityGroups,
    catalogue: Iterable[str],
    *,
    ks: Iterable[int] = TOPKS,
    fairness_ks: Iterable[int] = (10,),
    duplicate_rank: DuplicateRank = "first",
    reference_group7_bug: bool = False,
) -> dict[str, float | int]:
    r"""All of the paper's recommendation metrics for a [U, K] title matrix.

    Args:
        recommended: [U, K] recommended titles, rank 0 first (K = 10 in the paper).
        targets: U target titles.
        popularity: training-history popularity groups (the q of DGU/MGU).
        catalogue: all item titles.
        ks: cut-offs for HR/NDCG.
        fairness_ks: cut-offs for DGU/MGU (the paper reports @10).
        duplicate_rank: see `hit_ranks`.
        reference_group7_bug: see `group_fairness_at_k`.

    Returns:
        A flat dict: ``HR@K``, ``NDCG@K`` for ``ks``; ``DGU@K``, ``MGU@K`` for ``fairness_ks``; ``H`` and ``TTR``
        over all U·K titles (see `word_diversity`); ``invalid`` (titles not in the catalogue, official ``CC``);
        ``distinct_titles`` (official ``Title_num``); ``num_users``.

    Example:
        >>> from trl_flower.data.popularity import popularity_groups
        >>> pop = popularity_groups({"a": 3, "b": 1}, num_groups=2)
        >>> m = recommendation_metrics([["a", "b"], ["b", "x"]], ["b", "c"], pop, ["a", "b", "c"], ks=(1, 2),
        ...                            fairness_ks=(2,))
        >>> m["HR@2"], round(m["NDCG@2"], 4), m["invalid"], m["distinct_titles"]
        (0.5, 0.3155, 1, 3)
    """
    rec = as_title_matrix(recommended)  # [U, K]
    catalogue = set(catalogue)
    out: dict[str, float | int] = {}
    out.update(hr_ndcg_at_k(hit_matrix(rec, targets), ks, duplicate_rank))
    fair = group_fairness_at_k(rec, popularity, catalogue, fairness_ks, reference_group7_bug)
    out.update({k: v for k, v in fair.items() if not k.startswith("group_shares")})
    out["H"], out["TTR"] = word_diversity(rec.reshape(-1))
    out["invalid"] = invalid_count(rec, catalogue)
    out["distinct_titles"] = int(np.unique(rec).size)
    out["num_users"] = int(rec.shape[0])
    return out
