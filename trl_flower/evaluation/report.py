"""Evaluation reports: a JSON of all metrics, a markdown table, and PNG plots, for one method or several side by side.

`write_report` is the one entry point; ``trl-flower evaluate``, the demo and the benchmarks call it. It writes into
``output_dir``:

* ``<stem>.json``: ``{"title", "results": {method: metrics}, "group_shares": {...}, "reference_shares": [...],
  "item_frequencies": {...}, **metadata}``; NaN and infinities are written as ``null`` (strict JSON);
* ``<stem>.md``: the title, the metadata (command, settings, wall time), the metrics table (`markdown_table`: the
  paper's six metrics first), the group-share table and links to the plots;
* ``group_shares.png`` when ``group_shares`` is given (`plots.plot_group_shares`, the paper's Figure 2);
* ``item_frequency.png`` when ``generated_counts`` and ``target_counts`` are given (`plots.plot_item_frequencies`,
  the paper's Figure 4).

Example:
    >>> import tempfile
    >>> out = tempfile.TemporaryDirectory()
    >>> files = write_report({"SFT": {"NDCG@5": 0.1, "HR@5": 0.12}, "Flower": {"NDCG@5": 0.09, "HR@5": 0.125}},
    ...                      out.name, group_shares={"SFT": [0.8, 0.2], "Flower": [0.6, 0.4]},
    ...                      reference_shares=[0.7, 0.3])
    >>> sorted(files)
    ['group_shares_plot', 'json', 'markdown']
    >>> out.cleanup()
    >>> print(markdown_table({"SFT": {"NDCG@5": 0.1, "invalid": 0}}))
    | metric | SFT |
    |---|---|
    | NDCG@5 | 0.1000 |
    | invalid | 0 |
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PAPER_METRICS = ("NDCG@5", "HR@5", "DGU@10", "MGU@10", "H", "TTR")
"""The six metrics of the paper's Table 4, in its order."""

RECOMMENDATION_EXTRAS = ("HR@1", "NDCG@1", "HR@3", "NDCG@3", "HR@10", "NDCG@10", "invalid", "distinct_titles")
DISTRIBUTION_METRICS = (
    "title_KL(T||R)",
    "title_KL(R||T)",
    "title_JS",
    "token_KL(T||R)",
    "token_KL(R||T)",
    "token_JS",
    "out_of_set",
    "distinct_generated",
    "num_generated",
)
"""The distribution-fitting metrics (`distribution.distribution_metrics`, the paper's Table 3), in table order."""

COUNT_METRICS = frozenset(
    {"invalid", "distinct_titles", "num_users", "out_of_set", "distinct_generated", "num_generated", "unfinished"}
)
"""Metrics shown as integers."""

RESERVED_KEYS = ("title", "results", "group_shares", "reference_shares", "item_frequencies")

GROUP_SHARES_PNG = "group_shares.png"
ITEM_FREQUENCY_PNG = "item_frequency.png"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def table_columns(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The metric rows of the table: the paper's six, the other recommendation metrics, the distribution metrics
    (each only if some method has it), then any other scalar metric in first-seen order. Lists (e.g.
    ``group_shares@10``) are left out."""
    present: dict[str, None] = {}
    for metrics in results.values():
        for key, value in metrics.items():
            if _is_scalar(value):
                present[key] = None
    known = [k for k in (*PAPER_METRICS, *RECOMMENDATION_EXTRAS, *DISTRIBUTION_METRICS) if k in present]
    return known + [k for k in present if k not in known]


def format_value(name: str, value: Any) -> str:
    """One table cell: integers for counts, 4 decimals otherwise, ``nan`` for NaN/None, ``–`` when missing."""
    if value is None:
        return "nan"
    if not _is_scalar(value):
        return "–"
    value = float(value) if isinstance(value, np.floating) else value
    if isinstance(value, (int, np.integer)) or (name in COUNT_METRICS and float(value).is_integer()):
        return str(int(value))
    return "nan" if math.isnan(value) else f"{value:.4f}"


def escape_cell(text: str) -> str:
    """A table cell's text with ``|`` escaped (``KL(T||R)`` would otherwise split the cell)."""
    return str(text).replace("|", "\\|")


def markdown_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table with one row per metric and one column per method.

    Args:
        results: method name -> flat metric dict (`recommendation_metrics` / `distribution_metrics` output).
        columns: the metrics to show, in order (default `table_columns`).

    Returns:
        The table, without a trailing newline. A metric a method lacks shows ``–``.
    """
    if not results:
        raise ValueError("no results: pass {method name: {metric: value}} with at least one method")
    names = list(results)
    rows = [f"| metric | {' | '.join(map(escape_cell, names))} |", "|---" * (len(names) + 1) + "|"]
    for metric in columns if columns is not None else table_columns(results):
        cells = [format_value(metric, results[n].get(metric, "missing")) for n in names]
        rows.append(f"| {escape_cell(metric)} | {' | '.join(cells)} |")
    return "\n".join(rows)


def group_shares_table(
    group_shares: Mapping[str, Sequence[float]],
    reference_shares: Sequence[float] | None = None,
    reference_label: str = "history (train)",
) -> str:
    """A markdown table of popularity-group shares: one row per series, one column per group (1 = most popular)."""
    series = ([(reference_label, reference_shares)] if reference_shares is not None else []) + list(
        group_shares.items()
    )
    G = len(series[0][1])
    rows = ["| | " + " | ".join(f"G{g + 1}" for g in range(G)) + " |", "|---" * (G + 1) + "|"]
    for name, values in series:
        cells = ["nan" if v is None or math.isnan(v) else f"{v:.3f}" for v in values]
        rows.append(f"| {escape_cell(name)} | {' | '.join(cells)} |")
    return "\n".join(rows)


def to_json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars/arrays, paths and tuples to JSON types; NaN and ±inf become None."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _metadata_lines(metadata: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if "command" in metadata:
        lines += ["```", str(metadata["command"]), "```", ""]
    for key, value in metadata.items():
        if key == "command":
            continue
        if isinstance(value, Mapping):
            shown = ", ".join(
                f"{k}={v!r}" if isinstance(v, str) and "\n" in v else f"{k}={v}"
                for k, v in value.items()
                if not isinstance(v, (Mapping, list, tuple))
            )
        elif isinstance(value, (list, tuple)):
            continue
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:
            shown = str(value)
        lines.append(f"- {key}: {shown}")
    return lines + ([""] if lines and lines[-1] else [])


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    output_dir: str | os.PathLike,
    title: str = "trl-flower evaluation",
    *,
    group_shares: Mapping[str, Sequence[float]] | None = None,
    reference_shares: Sequence[float] | None = None,
    reference_label: str = "history (train)",
    generated_counts: Mapping[str, Mapping[str, float]] | None = None,
    target_counts: Mapping[str, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    stem: str = "metrics",
) -> dict[str, Path]:
    """Write the JSON, the markdown report and the plots for one or several methods.

    Args:
        results: method name -> flat metric dict, e.g. ``{"SFT": recommendation_metrics(...), "Flower": ...}``.
            Methods appear in this order everywhere.
        output_dir: created if needed; existing files of the same names are overwritten.
        title: the markdown heading and the JSON ``title``.
        group_shares: method name -> recommended share per popularity group (group 0 the most popular), e.g.
            ``group_fairness_at_k(...)["group_shares@10"]``; draws ``group_shares.png``.
        reference_shares: the groups' training-history interaction shares (``PopularityGroups.shares``), drawn and
            tabulated beside the methods.
        reference_label: the name of the reference series.
        generated_counts: distribution fitting: method name -> (title -> number of samples); with
            ``target_counts``, draws ``item_frequency.png``.
        target_counts: distribution fitting: the target title -> count.
        metadata: anything else for the JSON top level (``command``, ``versions``, ``settings``, ``seed``,
            ``wall_time_s``, ...); scalars and flat dicts are also listed in the markdown, ``command`` as a code
            block. Its keys must not be one of `RESERVED_KEYS`.
        columns: metric rows of the table (default `table_columns`).
        stem: file name stem of the JSON and markdown files.

    Returns:
        ``{"json": path, "markdown": path}`` plus ``"group_shares_plot"`` and/or ``"item_frequency_plot"``.

    Raises:
        ValueError: no results, a group-share series for an unknown method, or a reserved metadata key.
    """
    if not results:
        raise ValueError("no results: pass {method name: {metric: value}} with at least one method")
    metadata = dict(metadata or {})
    clash = [k for k in metadata if k in RESERVED_KEYS]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the report itself ({RESERVED_KEYS}); rename them")
    if group_shares is not None:
        unknown = [name for name in group_shares if name not in results]
        if unknown:
            raise ValueError(f"group_shares has methods {unknown} that are not in results {list(results)}")
    if (generated_counts is None) != (target_counts is None):
        raise ValueError("the item-frequency plot needs both generated_counts and target_counts (or neither)")

    from trl_flower.evaluation.plots import plot_group_shares, plot_item_frequencies

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    table = markdown_table(results, columns)
    md = [f"# {title}", "", *_metadata_lines(metadata), table, ""]
    payload: dict[str, Any] = {"title": title, "results": results}

    if group_shares is not None:
        files["group_shares_plot"] = out / GROUP_SHARES_PNG
        plot_group_shares(
            group_shares,
            reference_shares,
            reference_label=reference_label,
            title="Popularity-group shares of the recommendations",
            path=files["group_shares_plot"],
        )
        md += [
            "## Popularity-group shares",
            "",
            group_shares_table(group_shares, reference_shares, reference_label),
            "",
            f"![popularity-group shares]({GROUP_SHARES_PNG})",
            "",
        ]
        payload["group_shares"] = group_shares
        if reference_shares is not None:
            payload["reference_shares"] = reference_shares
    if generated_counts is not None and target_counts is not None:
        files["item_frequency_plot"] = out / ITEM_FREQUENCY_PNG
        plot_item_frequencies(
            target_counts,
            generated_counts,
            title="Generated vs target item frequencies",
            path=files["item_frequency_plot"],
        )
        md += ["## Item frequencies", "", f"![generated vs target item frequencies]({ITEM_FREQUENCY_PNG})", ""]
        payload["item_frequencies"] = {"target": target_counts, "generated": generated_counts}

    payload.update(metadata)
    files["json"].write_text(json.dumps(to_json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    files["markdown"].write_text("\n".join(md))
    return files
