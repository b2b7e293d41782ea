"""The Amazon splits loader and item popularity: real shared data (counts, CDs group shares) and validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trl_flower.data.amazon import (
    DATA_ENV,
    default_data_root,
    load_amazon,
    read_items,
    resolve_dataset_dir,
    select_rows,
)
from trl_flower.data.popularity import (
    group_sizes,
    history_item_counts,
    history_title_counts,
    popularity_from_histories,
    popularity_groups,
)

# Counts from each dataset's README.md (and flower_reference.md §5).
EXPECTED = {
    "CDs_and_Vinyl": dict(items=5841, train=49251, valid=6156, test=6157),
    "Movies_and_TV": dict(items=2653, train=21937, valid=2742, test=2743),
}
# gh_genre of the official code = interaction shares of the 8 groups (flower_reference.md §3.2).
CDS_SHARES = [0.4292, 0.1707, 0.1181, 0.0909, 0.0712, 0.0564, 0.0413, 0.0221]
MOVIES_SHARES = [0.3927, 0.1797, 0.1275, 0.0976, 0.0781, 0.0607, 0.0431, 0.0205]


@pytest.fixture(scope="module")
def cds(data_dir):
    return load_amazon(data_dir / "amazon" / "CDs_and_Vinyl")


@pytest.fixture(scope="module")
def movies(data_dir):
    return load_amazon(data_dir / "amazon" / "Movies_and_TV")


def test_readme_counts_match(cds, movies, data_dir):
    for data in (cds, movies):
        expected = EXPECTED[data.name]
        assert data.num_items == expected["items"]
        assert {s: d.num_rows for s, d in data.splits.items()} == {s: expected[s] for s in ("train", "valid", "test")}
        readme = (data_dir / "amazon" / data.name / "README.md").read_text()
        line = f"items: {expected['items']}; rows: train {expected['train']}, valid {expected['valid']}, test"
        assert line in readme  # the README still states the counts this test checks


def test_columns_types_and_order(cds):
    train = cds.splits["train"]
    assert train.column_names == ["history_item_id", "history_item_title", "item_id", "item_title", "row_index"]
    row = train[0]
    assert row == {
        "history_item_id": [1537],
        "history_item_title": ["Mister Magic"],
        "item_id": 3319,
        "item_title": "20th Century Masters: The Best of the Allman Brothers Band",
        "row_index": 0,
    }
    assert train["row_index"][-1] == train.num_rows - 1
    assert max(len(h) for h in train["history_item_id"]) == 10
    assert cds.items[3319] == row["item_title"]


def test_cds_popularity_shares_and_groups(cds):
    train = cds.splits["train"]
    pop = popularity_from_histories(train["history_item_title"])
    np.testing.assert_allclose(np.round(pop.shares, 4), CDS_SHARES, atol=0)
    assert sum(pop.title_counts.values()) == 252_643  # Z of flower_reference.md §1.1
    assert len(pop.title_counts) == 5364
    assert [len(g) for g in pop.groups] == [671, 671, 671, 671, 670, 670, 670, 670]  # 5364 = 8 * 670 + 4
    # 13 catalogue titles never appear in a training history: they go to the least popular group.
    outside = {t for t in cds.items if t not in pop.title_to_group}
    assert len(outside) == 13
    groups = pop.item_groups(cds.items)
    assert groups.shape == (cds.num_items,)
    assert all(groups[i] == 7 for i, t in enumerate(cds.items) if t in outside)
    # item-id counts add up to the same total; ids sharing a title add up to that title's count
    item_counts = history_item_counts(train["history_item_id"], cds.num_items)
    assert item_counts.sum() == 252_643
    ids = cds.title_to_ids()["Greatest Hits"]
    assert item_counts[ids].sum() == pop.title_counts["Greatest Hits"]


def test_movies_popularity_shares(movies):
    pop = popularity_from_histories(movies.splits["train"]["history_item_title"])
    np.testing.assert_allclose(np.round(pop.shares, 4), MOVIES_SHARES, atol=0)
    assert sum(pop.title_counts.values()) == 106_178


def test_history_title_counts_order_and_targets_not_counted():
    counts = history_title_counts([["b", "a"], ["a", "c", "a"]])
    assert list(counts.items()) == [("b", 1), ("a", 3), ("c", 1)]


def test_group_sizes_and_stable_ties():
    assert group_sizes(10, 8) == [2, 2, 1, 1, 1, 1, 1, 1]
    assert group_sizes(16, 8) == [2] * 8
    # ties keep first-appearance order: "x" (seen first) before "y"
    pop = popularity_groups({"x": 1, "big": 5, "y": 1, "z": 1}, num_groups=2)
    assert pop.groups == [["big", "x"], ["y", "z"]]
    np.testing.assert_allclose(pop.shares, [6 / 8, 2 / 8])
    assert pop.group_of("unknown") == 1
    with pytest.raises(ValueError, match="cannot fill"):
        popularity_groups({"a": 1}, num_groups=8)


def test_history_item_counts_rejects_bad_id():
    np.testing.assert_array_equal(history_item_counts([[0, 2], [2]], 4), [1, 0, 2, 0])
    with pytest.raises(ValueError, match="outside"):
        history_item_counts([[0, 5]], 4)


# --- validation on small hand-written datasets -------------------------------------------------------------------


def _write_dataset(root: Path, rows: list[str], items=("Alpha", "Beta", "Gamma")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(items)))
    header = "history_item_id,history_item_title,item_id,item_title\n"
    good = '"[0]","[""Alpha""]",1,Beta\n'
    for split in ("train", "valid", "test"):
        (root / f"{split}.csv").write_text(header + good + "".join(rows if split == "train" else []))
    return root


def test_small_dataset_loads(tmp_path):
    path = _write_dataset(tmp_path / "Tiny", ['"[0, 1]","[""Alpha"", ""Beta""]",2,Gamma\n'])
    data = load_amazon(path)
    assert data.name == "Tiny" and data.items == ["Alpha", "Beta", "Gamma"]
    assert data.splits["train"]["history_item_id"] == [[0], [0, 1]]
    assert data.splits["train"]["row_index"] == [0, 1]
    assert data.title_to_ids() == {"Alpha": [0], "Beta": [1], "Gamma": [2]}


@pytest.mark.parametrize(
    "row, message",
    [
        ('"[0, 7]","[""Alpha"", ""Beta""]",2,Gamma\n', r"train.csv:3: unknown item id 7 .*ids 0..2"),
        ('"[0]","[""Alpha""]",9,Gamma\n', r"train.csv:3: unknown item id 9 in column 'item_id'"),
        ('"[0]","[""Alpha""]",2,Gamma!\n', r"train.csv:3: title mismatch for item id 2 .*'Gamma!'.*'Gamma'"),
        ('"[1]","[""Alpah""]",2,Gamma\n', r"train.csv:3: title mismatch for item id 1 .*'Alpah'.*'Beta'"),
        ('"[0, 1","[""Alpha""]",2,Gamma\n', r"train.csv:3: column 'history_item_id' is not a JSON list"),
        ("\"['Alpha']\",\"['Alpha']\",2,Gamma\n", r"not a JSON list.*Python repr"),
        ('"[0]","[""Alpha"", ""Beta""]",2,Gamma\n', r"train.csv:3: history_item_id has 1 entries"),
        ('"[0]","[""Alpha""]",x,Gamma\n', r"train.csv:3: item_id 'x' is not an integer"),
        ('"{}","[""Alpha""]",2,Gamma\n', r"must be a JSON list, got dict"),
    ],
)
def test_invalid_rows_raise_with_location(tmp_path, row, message):
    path = _write_dataset(tmp_path / "Bad", [row])
    with pytest.raises(ValueError, match=message):
        load_amazon(path)


def test_items_file_errors(tmp_path):
    bad = tmp_path / "items.tsv"
    bad.write_text("item_id\ttitle\n0\tA\n2\tB\n")
    with pytest.raises(ValueError, match=r"items.tsv:3: item id '2' out of order"):
        read_items(bad)
    bad.write_text("id,title\n")
    with pytest.raises(ValueError, match="expected the header"):
        read_items(bad)
    bad.write_text("item_id\ttitle\n0\t \n")
    with pytest.raises(ValueError, match="item 0 has an empty title"):
        read_items(bad)


def test_data_root_resolution(tmp_path, monkeypatch):
    path = _write_dataset(tmp_path / "amazon" / "Tiny", [])
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    assert resolve_dataset_dir("Tiny") == path
    assert load_amazon("Tiny", splits=("test",)).splits["test"].num_rows == 1
    with pytest.raises(FileNotFoundError, match=r"dataset 'Nope' not found.*Available.*\['Tiny'\]"):
        resolve_dataset_dir("Nope")
    with pytest.raises(FileNotFoundError, match=r"nowhere/Tiny/items.tsv not found"):
        resolve_dataset_dir(tmp_path / "nowhere" / "Tiny")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"\\${DATA_ENV}=.*is not a directory"):
        default_data_root()


def test_missing_split_file(tmp_path):
    path = _write_dataset(tmp_path / "Tiny", [])
    (path / "valid.csv").unlink()
    with pytest.raises(FileNotFoundError, match="valid.csv not found"):
        load_amazon(path)


def test_json_lists_round_trip_with_quotes(tmp_path):
    # titles with commas, quotes and backslashes survive the CSV + JSON encoding
    items = ('Say "Hi", World', "Back\\Slash", "Plain")
    root = tmp_path / "Quotes"
    root.mkdir()
    (root / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(items)))
    import csv

    for split in ("train", "valid", "test"):
        with (root / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            w.writerow([json.dumps([0, 1]), json.dumps(list(items[:2])), 2, items[2]])
    data = load_amazon(root)
    assert data.splits["valid"]["history_item_title"] == [list(items[:2])]


def test_docs_data_examples_run_and_print_what_they_say(data_dir, monkeypatch):
    import contextlib
    import io
    import re

    monkeypatch.setenv(DATA_ENV, str(data_dir))
    doc = Path(__file__).resolve().parents[1] / "docs" / "data.md"
    namespace: dict = {}
    checked = 0
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block, str(doc), "exec"), namespace)
        for expected in re.findall(r"^print\(.*\n((?:# .*\n)+)", block, re.M):
            want = " ".join(line[2:] for line in expected.splitlines())
            assert want.split() == buffer.getvalue().split()[: len(want.split())]
            checked += 1
    assert checked == 2


def test_select_rows_first_or_random_sample():
    from datasets import Dataset

    split = Dataset.from_dict({"row_index": list(range(20))})
    assert select_rows(split, 0) is split and select_rows(split, 50) is split
    assert select_rows(split, 4)["row_index"] == [0, 1, 2, 3]
    sample = select_rows(split, 6, sample_seed=1)["row_index"]
    assert sample == sorted(sample) and len(set(sample)) == 6 and sample != list(range(6))
    assert select_rows(split, 6, sample_seed=1)["row_index"] == sample  # deterministic
    assert select_rows(split, 6, sample_seed=2)["row_index"] != sample
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        select_rows(split, -1)
