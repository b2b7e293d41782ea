"""Report figures (PNG) for the Flower paper's two evaluation plots, drawn with matplotlib's Agg canvas.

* `plot_group_shares`: the share of recommended titles per popularity group, one bar per method and group, next to
  the training-history interaction shares (the paper's Figure 2). Group 1 is the most popular.
* `plot_item_frequencies`: for distribution fitting, each target item's share among the generated samples next to
  its target share, items sorted by target count (the paper's Figure 4).
* `plot_tradeoff`: accuracy against popularity fairness (e.g. NDCG@5 against DGU@10), one marker per method and
  seed, so the trade-off frontier of several methods is seen at a glance.

Both build a `matplotlib.figure.Figure` on a `FigureCanvasAgg` directly: no `pyplot`, so no global state, no GUI
backend and no figure kept alive after the call. They return the figure (tests count its bars) and save it when
``path`` is given.

Example:
    >>> fig = plot_group_shares({"SFT": [0.7, 0.2, 0.1], "Flower": [0.4, 0.35, 0.25]}, reference=[0.5, 0.3, 0.2])
    >>> len(fig.axes[0].patches)  # 3 series x 3 groups
    9
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

REFERENCE_COLOR = "0.6"
# Colour-blind-safe palette (Okabe-Ito) for the methods, in order.
METHOD_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
# Bar hatches of the 1st, 2nd, ... round of the palette, so that more than 8 methods stay distinguishable.
METHOD_HATCHES = ("", "//", "..", "xx")
# Line styles of the 1st, 2nd, ... round of the palette, for the same reason in line plots.
METHOD_LINESTYLES = ("-", "--", ":", "-.")
MAX_LABELLED_ITEMS = 40  # above this many items the x axis shows ranks instead of titles


def _method_style(i: int, round_styles: tuple[str, ...]) -> tuple[str, str]:
    """Colour of the i-th method and the style (hatch, line style) of its round of the palette."""
    n_colors = len(METHOD_COLORS)
    return METHOD_COLORS[i % n_colors], round_styles[(i // n_colors) % len(round_styles)]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        fig.savefig(path, format="png")


def plot_group_shares(
    shares: Mapping[str, Sequence[float]],
    reference: Sequence[float] | None = None,
    *,
    reference_label: str = "history (train)",
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Grouped bars: each method's share of recommendations per popularity group, beside the reference shares.

    Args:
        shares: method name -> ``[p_0, ..., p_{G-1}]``, the share of its (valid) recommended titles in each group,
            group 0 the most popular (``group_fairness_at_k(...)["group_shares@K"]``). One method or several.
        reference: ``[q_0, ..., q_{G-1}]``, the groups' shares of training-history interactions
            (``PopularityGroups.shares``); drawn first, in grey. A method whose bars match these is fair in the
            paper's sense (DGU = MGU = 0).
        reference_label: legend label of the reference bars.
        title: axes title.
        path: write a PNG there.

    Returns:
        The figure: one axes with ``G × (len(shares) + (reference is not None))`` bars, series by series.

    Raises:
        ValueError: no series, or series of different lengths.
    """
    series: list[tuple[str, np.ndarray, str, str]] = []
    if reference is not None:
        series.append((reference_label, np.asarray(reference, dtype=np.float64), REFERENCE_COLOR, ""))
    for i, (name, values) in enumerate(shares.items()):
        series.append((str(name), np.asarray(values, dtype=np.float64), *_method_style(i, METHOD_HATCHES)))
    if not series:
        raise ValueError("nothing to plot: pass at least one method's group shares or the reference shares")
    G = series[0][1].size
    bad = [name for name, values, _, _ in series if values.shape != (G,)]
    if G == 0 or bad:
        raise ValueError(f"every series needs the same number of groups ({G}); these differ: {bad}")

    fig = _new_figure(max(6.0, 0.9 * G + 2.5), 3.8)
    ax = fig.add_subplot()
    x = np.arange(G)  # [G]
    width = 0.8 / len(series)
    for s, (name, values, color, hatch) in enumerate(series):
        offset = (s - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=name, color=color, hatch=hatch, edgecolor="white", linewidth=0.5)
    ax.set_xticks(x, [str(g + 1) for g in range(G)])
    ax.set_xlabel("popularity group (1 = most popular)")
    ax.set_ylabel("share")
    top = max((float(np.nanmax(v)) for _, v, _, _ in series if np.isfinite(v).any()), default=0.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)  # NaN shares (no valid recommendation) draw no bar
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig


def item_frequency_table(
    target_counts: Mapping[str, float], generated_counts: Mapping[str, float]
) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """Target items sorted by target count (descending, stable), with target and generated shares.

    Returns:
        ``(titles, target_share [X], generated_share [X], out_of_set_share)``: shares of all target counts and of
        all generated samples; ``out_of_set_share`` is the share of samples that are not target items.
    """
    titles = sorted(target_counts, key=lambda t: -float(target_counts[t]))  # stable: ties keep file order
    t = np.array([float(target_counts[k]) for k in titles], dtype=np.float64)  # [X]
    total = float(sum(generated_counts.values()))
    if t.sum() <= 0 or total <= 0:
        raise ValueError("target and generated counts must each have a positive total")
    r = np.array([float(generated_counts.get(k, 0.0)) for k in titles], dtype=np.float64)  # [X]
    out_of_set = total - r.sum()
    return titles, t / t.sum(), r / total, float(out_of_set / total)


def plot_item_frequencies(
    target_counts: Mapping[str, float],
    generated: Mapping[str, Mapping[str, float]],
    *,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Distribution fitting: each target item's share among the generated samples vs its target share.

    Items are sorted by target count (most frequent first). The target is drawn as grey bars (one per item); every
    method's generated shares as a line with markers. The share of samples outside the target set, if any, is in
    the method's legend label. Up to 40 items the x axis names the titles; beyond that it shows the rank.

    Args:
        target_counts: title -> count (the target distribution T, e.g. ``movies_100.json``).
        generated: method name -> (title -> number of samples), e.g. ``{"Flower": Counter(sampled_titles)}``.
        title: axes title.
        path: write a PNG there.

    Returns:
        The figure: one axes with one bar per target item and one line per method.
    """
    if not generated:
        raise ValueError("nothing to plot: pass at least one method's generated title counts")
    titles, t, _, _ = item_frequency_table(target_counts, next(iter(generated.values())))
    X = len(titles)
    fig = _new_figure(min(max(7.0, 0.22 * X + 2.0), 16.0), 4.2 if X <= MAX_LABELLED_ITEMS else 3.8)
    ax = fig.add_subplot()
    x = np.arange(X)  # [X]
    ax.bar(x, t, 0.8, color=REFERENCE_COLOR, label="target", linewidth=0)
    for i, (name, counts) in enumerate(generated.items()):
        _, _, r, out_of_set = item_frequency_table(target_counts, counts)
        label = f"{name} (outside target: {out_of_set:.1%})" if out_of_set > 0 else str(name)
        dense = X > 200  # markers would merge into a band
        color, linestyle = _method_style(i, METHOD_LINESTYLES)
        ax.plot(
            x,
            r,
            color=color,
            marker=None if dense else "o",
            linestyle=linestyle,
            markersize=2.5 if X > 50 else 3.5,
            linewidth=0.6 if dense else 1.0,
            alpha=0.85 if dense else 1.0,
            label=label,
        )
    if X <= MAX_LABELLED_ITEMS:
        ax.set_xticks(x, [k if len(k) <= 28 else k[:27] + "…" for k in titles], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("item rank by target count (1 = most frequent)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v)) + 1}"))  # 1-based ranks
        ax.set_xlim(-0.5, X - 0.5)
    ax.set_ylabel("share of samples")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig


def plot_tradeoff(
    points: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_label: str = "NDCG@5 (higher is better)",
    y_label: str = "DGU@10 (lower is fairer)",
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Scatter of (accuracy, unfairness) per method: one marker per seed, the method's mean as a larger marker.

    The better corner is bottom right (accurate and fair). A method dominates another when its markers lie right of
    and below the other's.

    Args:
        points: method name -> ``[(x, y), ...]``, one pair per seed (e.g. ``(NDCG@5, DGU@10)``).
        x_label, y_label, title: axis labels and title.
        path: write a PNG there.

    Returns:
        The figure: one axes with two scatter collections per method (seeds, mean).

    Example:
        >>> fig = plot_tradeoff({"BIGRec": [(0.04, 0.45), (0.05, 0.43)], "Flower": [(0.05, 0.3)]})
        >>> len(fig.axes[0].collections)  # seeds and mean for each of the two methods
        4
    """
    if not points or any(len(p) == 0 for p in points.values()):
        raise ValueError("nothing to plot: every method needs at least one (x, y) point")
    fig = _new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    for i, (name, pts) in enumerate(points.items()):
        xy = np.asarray(pts, dtype=np.float64).reshape(-1, 2)  # [seeds, 2]
        color, _ = _method_style(i, METHOD_HATCHES)
        marker = markers[i % len(markers)]
        ax.scatter(xy[:, 0], xy[:, 1], color=color, marker=marker, alpha=0.45, s=30)
        mean = xy.mean(axis=0)
        ax.scatter([mean[0]], [mean[1]], color=color, marker=marker, s=110, edgecolor="black", label=str(name))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    _save(fig, path)
    return fig
