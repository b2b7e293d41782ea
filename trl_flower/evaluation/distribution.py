r"""Distribution fitting (the paper's RQ1, Table 3): how close generated items are to a target item distribution.

Given the titles a model generated (one per sample) and a target mapping title -> count T, this module computes, in
natural log,

.. math::
    \mathrm{KL}(T\Vert R) = \sum_x t_x \ln\frac{t_x}{r_x}, \quad
    \mathrm{KL}(R\Vert T) = \sum_x r_x \ln\frac{r_x}{t_x}, \quad
    \mathrm{JS} = \tfrac12 \mathrm{KL}(R\Vert M) + \tfrac12 \mathrm{KL}(T\Vert M),\ M = \tfrac12 (R + T),

at two levels (flower_reference.md §3.3):

* **Title level** (`title_divergences`): generated titles outside T are pooled into one ``Not_in_dataset`` bucket;
  T gets :math:`\varepsilon` (float64 machine epsilon) there, any target title never generated gets count
  :math:`\varepsilon` on the generated side, and both histograms are normalised. The bucket is always present (the
  official Lightning version; with no out-of-set generations both sides hold :math:`\varepsilon` there).
* **Token level** (`token_divergences`): histograms over token ids of ``encode(title)`` (no special tokens), every
  occurrence of a token weighted by its title's count, for the target and for the generated titles (all of them,
  in or out of T); token ids missing on one side get :math:`\varepsilon`.

Note:
    The official notebook builds the generated-side token histogram with a membership test on int keys while
    storing str keys, so each token ends up with the count of the *last* title containing it. This module counts
    correctly (a sum over all titles and occurrences); numbers can differ from the notebook's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

NOT_IN_DATASET = "Not_in_dataset"
EPS = float(np.finfo(np.float64).eps)


def count_titles(generated: Iterable[str] | Mapping[str, float]) -> dict[str, float]:
    """Generated title -> count. A mapping is taken as counts already; an iterable holds one title per sample."""
    if isinstance(generated, Mapping):
        counts = {str(k): float(v) for k, v in generated.items()}
    else:
        counts = {}
        for title in generated:
            counts[title] = counts.get(title, 0.0) + 1.0
    if not counts or sum(counts.values()) <= 0:
        raise ValueError("no generated titles: pass at least one generated title (or a non-zero count mapping)")
    if any(v < 0 for v in counts.values()):
        raise ValueError("generated counts must be non-negative")
    return counts


def _check_target(target: Mapping[str, float]) -> None:
    if not target:
        raise ValueError("the target distribution is empty: pass a title -> count mapping")
    if NOT_IN_DATASET in target:
        raise ValueError(f"the target has a title named {NOT_IN_DATASET!r}, the reserved out-of-set bucket; rename it")
    if any(v <= 0 for v in target.values()):
        bad = next(k for k, v in target.items() if v <= 0)
        raise ValueError(f"target count of {bad!r} is {target[bad]}; target counts must be positive")


def divergences(t: np.ndarray, r: np.ndarray) -> dict[str, float]:
    r"""KL(T‖R), KL(R‖T) and JS (natural log) of two aligned positive histograms (normalised here).

    .. math::
        \mathrm{KL}(T\Vert R) = \sum_x t_x \ln\frac{t_x}{r_x}, \quad
        \mathrm{JS} = \tfrac12 \sum_x r_x \ln\frac{r_x}{m_x} + \tfrac12 \sum_x t_x \ln\frac{t_x}{m_x},
        \ m = \tfrac12 (r + t).

    Raises:
        ValueError: shapes differ or an entry is not positive (fill missing entries with ``EPS`` first).
    """
    t = np.asarray(t, dtype=np.float64)  # [X]
    r = np.asarray(r, dtype=np.float64)  # [X]
    if t.shape != r.shape or t.ndim != 1:
        raise ValueError(f"histograms must be aligned 1-D arrays, got shapes {t.shape} and {r.shape}")
    if (t <= 0).any() or (r <= 0).any():
        raise ValueError("histogram entries must be positive; give missing entries a count of EPS")
    t = t / t.sum()
    r = r / r.sum()
    m = 0.5 * (t + r)  # [X]
    kl_tr = float(np.sum(t * np.log(t / r)))
    kl_rt = float(np.sum(r * np.log(r / t)))
    js = float(0.5 * np.sum(r * np.log(r / m)) + 0.5 * np.sum(t * np.log(t / m)))
    return {"KL(T||R)": kl_tr, "KL(R||T)": kl_rt, "JS": js}


def title_histograms(
    generated: Iterable[str] | Mapping[str, float], target: Mapping[str, float]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Aligned title-level histograms with the out-of-set bucket.

    Returns:
        ``(keys, t, r)``: the target titles in their order followed by ``Not_in_dataset``; the target counts (EPS for
        the bucket) and the generated counts (out-of-set titles pooled in the bucket, EPS where nothing was
        generated). Unnormalised.
    """
    _check_target(target)
    gen = count_titles(generated)
    keys = [*target, NOT_IN_DATASET]
    t = np.array([float(v) for v in target.values()] + [EPS], dtype=np.float64)  # [X+1]
    out_of_set = sum(c for title, c in gen.items() if title not in target)
    r = np.array([gen.get(title, 0.0) for title in target] + [out_of_set], dtype=np.float64)  # [X+1]
    r[r == 0] = EPS
    return keys, t, r


def title_divergences(generated: Iterable[str] | Mapping[str, float], target: Mapping[str, float]) -> dict[str, float]:
    """Title-level KL(T‖R), KL(R‖T), JS of the generated titles against the target counts (see the module doc)."""
    _, t, r = title_histograms(generated, target)
    return divergences(t, r)


def token_histogram(title_counts: Mapping[str, float], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token-id histogram of titles weighted by their counts (every occurrence of a token counts).

    Args:
        title_counts: title -> count.
        tokenizer: a Hugging Face tokenizer, called as ``tokenizer(titles, add_special_tokens=False)``.

    Returns:
        ``(ids, weights)``: the sorted distinct token ids and their summed weights.
    """
    titles = list(title_counts)
    encoded = tokenizer(titles, add_special_tokens=False)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)  # [N]
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=int(lengths.sum()))  # [L]
    weight = np.repeat(np.array([title_counts[t] for t in titles], dtype=np.float64), lengths)  # [L]
    ids, inverse = np.unique(flat, return_inverse=True)  # [V], [L]
    return ids, np.bincount(inverse, weights=weight, minlength=ids.size)


def token_divergences(
    generated: Iterable[str] | Mapping[str, float], target: Mapping[str, float], tokenizer: Any
) -> dict[str, float]:
    """Token-level KL(T‖R), KL(R‖T), JS over the union of token ids (EPS where one side has none)."""
    _check_target(target)
    t_ids, t_w = token_histogram(target, tokenizer)
    r_ids, r_w = token_histogram(count_titles(generated), tokenizer)
    ids = np.union1d(t_ids, r_ids)  # [V]
    t = np.full(ids.size, EPS)
    r = np.full(ids.size, EPS)
    t[np.searchsorted(ids, t_ids)] = t_w
    r[np.searchsorted(ids, r_ids)] = r_w
    return divergences(t, r)


def distribution_metrics(
    generated: Iterable[str] | Mapping[str, float], target: Mapping[str, float], tokenizer: Any | None = None
) -> dict[str, float]:
    """Title-level (and, with a tokenizer, token-level) divergences plus counts, with Table 3's names.

    Returns:
        ``title_KL(T||R)``, ``title_KL(R||T)``, ``title_JS``, and ``token_...`` the same when ``tokenizer`` is given;
        ``num_generated`` (samples), ``out_of_set`` (samples outside T), ``distinct_generated`` (distinct titles).
    """
    gen = count_titles(list(generated) if not isinstance(generated, Mapping) else generated)
    out = {f"title_{k}": v for k, v in title_divergences(gen, target).items()}
    if tokenizer is not None:
        out.update({f"token_{k}": v for k, v in token_divergences(gen, target, tokenizer).items()})
    out["num_generated"] = float(sum(gen.values()))
    out["out_of_set"] = float(sum(c for title, c in gen.items() if title not in target))
    out["distinct_generated"] = float(sum(1 for c in gen.values() if c > 0))
    return out
