"""Reports and plots: the files `write_report` writes hold exactly the given numbers; the figures have one bar per
(series, group) or per target item, at the given heights."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from trl_flower.data.popularity import popularity_groups
from trl_flower.evaluation.distribution import distribution_metrics
from trl_flower.evaluation.metrics import recommendation_metrics
from trl_flower.evaluation.plots import item_frequency_table, plot_group_shares, plot_item_frequencies
from trl_flower.evaluation.report import (
    PAPER_METRICS,
    format_value,
    markdown_table,
    table_columns,
    to_json_safe,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Q = [0.4, 0.2, 0.15, 0.1, 0.07, 0.05, 0.02, 0.01]  # reference shares of 8 groups


def parse_table(text: str) -> dict[str, list[str]]:
    """The first markdown table in `text` as {first cell: other cells}, header row included; ``\\|`` unescaped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] == "---":
            continue  # the |---| separator
        rows[cells[0]] = cells[1:]
    return rows


def table_value(cell: str) -> float:
    return float("nan") if cell == "nan" else float(cell)


@pytest.fixture
def two_methods() -> dict[str, dict]:
    """Real metric dicts of two 'methods' on a hand-made example (one of them recommends an invalid title)."""
    pop = popularity_groups({t: c for t, c in zip("abcdefgh", [9, 7, 5, 4, 3, 2, 2, 1])})
    catalogue = list("abcdefghij")
    targets = ["a", "c", "j"]
    sft = recommendation_metrics(
        [list("abcdefghij")[i:] + list("abcdefghij")[:i] for i in (0, 1, 2)], targets, pop, catalogue
    )
    flower = recommendation_metrics(
        [list("jihgfedcba"), list("cxbadefghi"), list("aaaaaaaaaa")], targets, pop, catalogue
    )
    return {"SFT": sft, "Flower": flower}


def test_markdown_table_values_equal_the_metrics(two_methods):
    table = markdown_table(two_methods)
    rows = parse_table(table)
    assert rows["metric"] == ["SFT", "Flower"]
    metric_rows = [name for name in rows if name != "metric"]
    assert metric_rows[:6] == list(PAPER_METRICS)  # the paper's six first, in Table 4's order
    assert metric_rows[6:] == [
        "HR@1",
        "NDCG@1",
        "HR@3",
        "NDCG@3",
        "HR@10",
        "NDCG@10",
        "invalid",
        "distinct_titles",
        "num_users",
    ]
    for name in metric_rows:
        for cell, method in zip(rows[name], ["SFT", "Flower"]):
            value = two_methods[method][name]
            if isinstance(value, int):
                assert cell == str(value), name
            else:
                assert table_value(cell) == pytest.approx(round(value, 4), abs=1e-12), (name, method)
    assert rows["invalid"] == ["0", "1"]  # "x" is not a catalogue title


def test_table_escapes_pipes_and_marks_missing_metrics():
    target = {"a": 3.0, "b": 1.0}
    dist = distribution_metrics(["a", "a", "b", "zz"], target)
    table = markdown_table({"Flower": dist, "SFT": {"title_JS": 0.25}})
    rows = parse_table(table)
    assert rows["title_KL(T||R)"][0] == f"{dist['title_KL(T||R)']:.4f}"
    assert rows["title_KL(T||R)"][1] == "–"  # SFT has no such metric
    assert rows["title_JS"] == [f"{dist['title_JS']:.4f}", "0.2500"]
    assert rows["out_of_set"][0] == "1" and rows["num_generated"][0] == "4"  # counts as integers
    assert all(line.count("|") - line.count("\\|") == 4 for line in table.splitlines())  # 3 columns everywhere


def test_format_value():
    assert format_value("NDCG@5", 0.123456) == "0.1235"
    assert format_value("NDCG@5", float("nan")) == "nan"
    assert format_value("DGU@10", None) == "nan"  # JSON null of a NaN
    assert format_value("invalid", np.int64(3)) == "3"
    assert format_value("out_of_set", 2.0) == "2"
    assert format_value("H", np.float32(8.5)) == "8.5000"
    assert table_columns({"a": {"group_shares@10": [0.5, 0.5], "custom": 1.5, "HR@5": 0.1}}) == ["HR@5", "custom"]


def test_write_report_files_hold_the_given_numbers(two_methods, tmp_path):
    shares = {"SFT": [0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0], "Flower": Q[::-1]}
    two_methods["Flower"]["DGU@10"] = float("nan")  # e.g. no valid recommendation
    metadata = {
        "command": "trl-flower evaluate --model m --data d",
        "seed": 7,
        "settings": {"top_k": 10, "batch_size": 16},
        "versions": {"torch": "x"},
    }
    files = write_report(
        two_methods,
        tmp_path / "rep",
        "SFT vs Flower",
        group_shares=shares,
        reference_shares=np.array(Q),
        metadata=metadata,
    )
    assert set(files) == {"json", "markdown", "group_shares_plot"}
    assert all(path.parent == tmp_path / "rep" for path in files.values())

    saved = json.loads(files["json"].read_text())
    assert saved["title"] == "SFT vs Flower"
    assert list(saved["results"]) == ["SFT", "Flower"]
    for method, metrics in two_methods.items():
        for name, value in metrics.items():
            expected = None if isinstance(value, float) and math.isnan(value) else value
            assert saved["results"][method][name] == expected, (method, name)
    assert saved["group_shares"] == shares and saved["reference_shares"] == Q
    assert saved["command"] == metadata["command"] and saved["seed"] == 7
    assert saved["settings"] == metadata["settings"] and saved["versions"] == {"torch": "x"}

    md = files["markdown"].read_text()
    assert md.startswith("# SFT vs Flower\n")
    assert "```\ntrl-flower evaluate --model m --data d\n```" in md
    assert "- settings: top_k=10, batch_size=16" in md
    assert markdown_table(two_methods) in md
    assert parse_table(md)["DGU@10"][1] == "nan"
    assert "![popularity-group shares](group_shares.png)" in md
    shares_table = md.split("## Popularity-group shares")[1]
    share_rows = parse_table(shares_table)
    assert share_rows["history (train)"] == [f"{q:.3f}" for q in Q]
    assert share_rows["Flower"] == [f"{q:.3f}" for q in Q[::-1]]

    png = files["group_shares_plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_write_report_distribution_plot(tmp_path):
    target = {"a": 50, "b": 30, "c": 20}
    generated = {"Flower": {"a": 5, "b": 3, "c": 1, "zz": 1}, "SFT": {"a": 10}}
    results = {name: distribution_metrics(counts, target) for name, counts in generated.items()}
    files = write_report(results, tmp_path, generated_counts=generated, target_counts=target, stem="dist")
    assert set(files) == {"json", "markdown", "item_frequency_plot"}
    assert files["json"].name == "dist.json" and files["markdown"].name == "dist.md"
    assert files["item_frequency_plot"].read_bytes().startswith(PNG_SIGNATURE)
    saved = json.loads(files["json"].read_text())
    assert saved["item_frequencies"] == {"target": target, "generated": generated}
    assert saved["results"]["Flower"]["out_of_set"] == 1.0
    assert "![generated vs target item frequencies](item_frequency.png)" in files["markdown"].read_text()


def test_write_report_errors(tmp_path):
    one = {"A": {"HR@5": 0.1}}
    with pytest.raises(ValueError, match="no results"):
        write_report({}, tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        write_report(one, tmp_path, metadata={"results": 1})
    with pytest.raises(ValueError, match="not in results"):
        write_report(one, tmp_path, group_shares={"B": [1.0]})
    with pytest.raises(ValueError, match="both generated_counts and target_counts"):
        write_report(one, tmp_path, generated_counts={"A": {"x": 1}})
    assert not list(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_to_json_safe():
    value = {
        "a": np.float32(0.5),
        "b": [np.int64(2), float("inf")],
        "c": (1, float("nan")),
        3: Path("/x"),
        "d": np.arange(2),
    }
    assert to_json_safe(value) == {"a": 0.5, "b": [2, None], "c": [1, None], "3": "/x", "d": [0, 1]}
    json.dumps(to_json_safe(value), allow_nan=False)


def _bars(fig):
    return fig.axes[0].patches


def test_group_shares_plot_bars_are_the_shares(tmp_path):
    shares = {"SFT": [0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0], "Flower": Q[::-1]}
    fig = plot_group_shares(shares, Q, title="t", path=tmp_path / "g.png")
    bars = _bars(fig)
    assert len(bars) == 3 * 8  # reference + 2 methods, 8 groups each
    heights = np.array([b.get_height() for b in bars]).reshape(3, 8)  # series by series
    np.testing.assert_allclose(heights, [Q, shares["SFT"], shares["Flower"]])
    lefts = np.array([b.get_x() for b in bars]).reshape(3, 8)
    assert (np.diff(lefts, axis=0) > 0).all()  # within a group, reference then SFT then Flower, side by side
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["history (train)", "SFT", "Flower"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(g) for g in range(1, 9)]
    png = (tmp_path / "g.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

    assert len(_bars(plot_group_shares({"only": [0.6, 0.4]}))) == 2  # no reference: one series
    with pytest.raises(ValueError, match="same number of groups"):
        plot_group_shares({"A": [0.5, 0.5]}, reference=[0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_group_shares({})


def test_group_shares_plot_keeps_more_methods_than_colours_apart():
    from trl_flower.evaluation.plots import METHOD_COLORS

    n = len(METHOD_COLORS) + 2  # the palette wraps around
    fig = plot_group_shares({f"m{i}": [0.5, 0.5] for i in range(n)})
    styles = [(tuple(b.get_facecolor()), b.get_hatch() or "") for b in _bars(fig)[::2]]  # first bar of each series
    assert len(set(styles)) == n
    assert styles[0][0] == styles[len(METHOD_COLORS)][0]  # same colour, told apart by the hatch


def test_item_frequency_plot_keeps_more_methods_than_colours_apart():
    from trl_flower.evaluation.plots import METHOD_COLORS

    n = len(METHOD_COLORS) + 2  # the palette wraps around
    fig = plot_item_frequencies({"a": 2, "b": 1}, {f"m{i}": {"a": 1} for i in range(n)})
    styles = [(line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()]
    assert len(set(styles)) == n
    assert styles[0][0] == styles[len(METHOD_COLORS)][0]  # same colour, told apart by the line style


def test_item_frequency_plot_one_bar_per_target_item(tmp_path):
    target = {"b": 10, "a": 30, "c": 20, "d": 20, "e": 5}  # sorted by count: a, c, d (tie kept in file order), b, e
    flower = {"a": 6, "c": 2, "b": 1, "zz": 1}
    fig = plot_item_frequencies(target, {"Flower": flower, "SFT": {"e": 4}}, path=tmp_path / "f.png")
    bars = _bars(fig)
    assert len(bars) == len(target)
    np.testing.assert_allclose([b.get_height() for b in bars], np.array([30, 20, 20, 10, 5]) / 85)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "c", "d", "b", "e"]
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_ydata(), [0.6, 0.2, 0.0, 0.1, 0.0])  # shares of all 10 samples
    np.testing.assert_allclose(lines[1].get_ydata(), [0, 0, 0, 0, 1.0])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["Flower (outside target: 10.0%)", "SFT", "target"]
    assert (tmp_path / "f.png").read_bytes().startswith(PNG_SIGNATURE)

    titles, t, r, out = item_frequency_table(target, flower)
    assert titles == ["a", "c", "d", "b", "e"] and out == pytest.approx(0.1) and r.sum() == pytest.approx(0.9)

    many = {f"item {i}": 1000 - i for i in range(300)}
    fig = plot_item_frequencies(many, {"M": {"item 0": 3}})
    assert len(_bars(fig)) == 300
    assert "rank" in fig.axes[0].get_xlabel()  # too many items to name: ranks on the x axis


def test_docs_evaluation_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    from test_metrics import run_doc_blocks

    monkeypatch.chdir(tmp_path)  # the examples write their report into the working directory
    assert run_doc_blocks(Path(__file__).resolve().parents[1] / "docs" / "evaluation.md") == 2


def test_module_examples_run():
    import doctest

    import trl_flower.evaluation.plots as plots_module
    import trl_flower.evaluation.report as report_module

    for module in (report_module, plots_module):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted >= 2, module.__name__
