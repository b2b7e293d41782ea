"""`prepare`: small raw Amazon 2018 files written here (with malformed lines) -> exact expected splits."""

from __future__ import annotations

import filecmp
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from trl_flower.cli.prepare import main as prepare_main
from trl_flower.cli.prepare import make_parser
from trl_flower.data.amazon import load_amazon, read_items, read_split
from trl_flower.data.prepare import (
    build_rows,
    clean_title,
    k_core_mask,
    prepare_amazon,
    shuffled_item_ids,
    split_rows,
    write_dataset,
)


def cli_main(argv: list[str]) -> int:
    """`trl-flower prepare ...` through this subcommand's own `main` (other subcommands are not imported)."""
    assert argv[0] == "prepare"
    return prepare_main(argv[1:])


DAY = 86_400
JAN1 = 1_514_764_800  # 2018-01-01 00:00 UTC


def T(day: int) -> int:
    """Unix time of 2018-01-01 + day days."""
    return JAN1 + day * DAY


META_LINES = [
    json.dumps({"asin": "A1", "title": "Alpha &amp; Omega"}),  # 1: HTML-unescaped
    json.dumps({"asin": "A2", "title": ' "Beta" '}),  # 2: quotes and spaces stripped
    json.dumps({"asin": "A3", "title": "Gamma\tRay", "price": "$1"}),  # 3: tab -> space
    json.dumps({"asin": "A4", "title": "X"}),  # 4: too short
    '{"asin": "A5", "title": ',  # 5: bad JSON
    json.dumps({"asin": "A6"}),  # 6: no title
    json.dumps({"asin": "A3", "title": "Gamma again"}),  # 7: duplicate asin (first line wins)
    json.dumps({"title": "No asin"}),  # 8: missing asin
    json.dumps({"asin": "A7", "title": " ".join(["w"] * 21)}),  # 9: 21 words
    json.dumps({"asin": "A8", "title": "Delta"}),  # 10
    "[1, 2]",  # 11: not an object
    "",  # 12: blank
    json.dumps({"asin": "A9", "title": "Epsilon"}),  # 13: removed later by the k-core
]


def review(user: str, asin: str, time) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": time, "overall": 5.0})


REVIEW_LINES = [
    review("u1", "A1", T(1)),  # 1
    review("u1", "A2", T(2)),  # 2
    review("u2", "A1", T(2)),  # 3
    review("u1", "A3", T(5)),  # 4
    review("u2", "A3", T(3)),  # 5
    '{"reviewerID": "u9", "asin": "A1", "unixReviewTime": 15',  # 6: bad JSON
    review("u3", "A9", T(1)),  # 7: k-core round 2
    review("u2", "A2", T(3)),  # 8: same time as line 5 -> after it (file order)
    review("u1", "A4", T(4)),  # 9: item without a kept title
    review("u1", "A1", T(-5)),  # 10: before the window
    review("u1", "A1", T(31)),  # 11: 2018-02-01, the end is exclusive
    json.dumps({"asin": "A1", "unixReviewTime": T(1)}),  # 12: missing reviewerID
    review("u2", "A1", "abc"),  # 13: bad time
    review("u4", "A8", T(6)),  # 14
    review("u4", "A1", T(7)),  # 15
    review("u4", "A8", T(8)),  # 16: a repeated item is kept
    review("u1", "A8", T(9)),  # 17
    None,  # 18: invalid UTF-8 (written as bytes below)
    review("u5", "A8", T(10)),  # 19: u5 has one interaction -> k-core round 1
    review("u3", "A1", T(4)),  # 20: k-core round 3 (u3 is left with one interaction)
    review("u6", "A9", T(2)),  # 21: k-core round 1, then A9 has one interaction left
    json.dumps({"reviewerID": "u7", "asin": "A1"}),  # 22: missing unixReviewTime
]


def write_raw(tmp_path: Path, gz_meta: bool = True) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = raw / "Toys.json.gz"
    with gzip.open(reviews, "wb") as f:
        for line in REVIEW_LINES:
            f.write(b'{"reviewerID": "u8", "asin": "A1\xff\xfe"}\r\n' if line is None else line.encode() + b"\r\n")
    meta = raw / ("meta_Toys.json.gz" if gz_meta else "meta_Toys.json")
    data = ("\n".join(META_LINES) + "\n").encode()
    if gz_meta:
        with gzip.open(meta, "wb") as f:
            f.write(data)
    else:
        meta.write_bytes(data)
    return reviews, meta


# item ids: sorted asins [A1, A2, A3, A8] shuffled with random.Random(42) -> [A3, A2, A8, A1]
EXPECTED_ITEMS = "item_id\ttitle\n0\tGamma Ray\n1\tBeta\n2\tDelta\n3\tAlpha & Omega\n"
HEADER = "history_item_id,history_item_title,item_id,item_title\r\n"
# rows by target time: u1 A1->A2 (day 2); u2 A1->A3, u2 [A1, A3]->A2 (day 3); u1 [A1, A2]->A3 (day 5, history cut to
# 2); u4 A8->A1 (day 7); u4 [A8, A1]->A8 (day 8); u1 [A2, A3]->A8 (day 9). N = 7: train 5, valid 1, test 1.
EXPECTED_TRAIN = HEADER + (
    '[3],"[""Alpha & Omega""]",1,Beta\r\n'
    '[3],"[""Alpha & Omega""]",0,Gamma Ray\r\n'
    '"[3, 0]","[""Alpha & Omega"", ""Gamma Ray""]",1,Beta\r\n'
    '"[3, 1]","[""Alpha & Omega"", ""Beta""]",0,Gamma Ray\r\n'
    '[2],"[""Delta""]",3,Alpha & Omega\r\n'
)
EXPECTED_VALID = HEADER + '"[2, 3]","[""Delta"", ""Alpha & Omega""]",2,Delta\r\n'
EXPECTED_TEST = HEADER + '"[1, 0]","[""Beta"", ""Gamma Ray""]",2,Delta\r\n'

EXPECTED_SKIPPED = {
    "meta:bad_json": {"count": 1, "first_lines": [5]},
    "meta:blank_line": {"count": 1, "first_lines": [12]},
    "meta:duplicate_asin": {"count": 1, "first_lines": [7]},
    "meta:missing_asin": {"count": 1, "first_lines": [8]},
    "meta:no_title": {"count": 1, "first_lines": [6]},
    "meta:not_an_object": {"count": 1, "first_lines": [11]},
    "meta:title_too_long": {"count": 1, "first_lines": [9]},
    "meta:title_too_short": {"count": 1, "first_lines": [4]},
    "reviews:bad_json": {"count": 1, "first_lines": [6]},
    "reviews:bad_unixReviewTime": {"count": 1, "first_lines": [13]},
    "reviews:bad_utf8": {"count": 1, "first_lines": [18]},
    "reviews:item_without_title": {"count": 1, "first_lines": [9]},
    "reviews:missing_reviewerID": {"count": 1, "first_lines": [12]},
    "reviews:missing_unixReviewTime": {"count": 1, "first_lines": [22]},
    "reviews:outside_time_window": {"count": 2, "first_lines": [10, 11]},
    "reviews:removed_by_k_core": {"count": 4, "first_lines": [7, 19, 20, 21]},
}


def test_prepare_small_raw_files_exact_output(tmp_path, capsys):
    reviews, meta = write_raw(tmp_path)
    out = tmp_path / "Toys"
    stats = prepare_amazon(reviews, meta, out, start="2018-01-01", end="2018-02-01", k_core=2, max_history=2,
                           progress=False)  # fmt: skip
    assert (out / "items.tsv").read_text(encoding="utf-8") == EXPECTED_ITEMS
    assert (out / "train.csv").read_bytes().decode() == EXPECTED_TRAIN
    assert (out / "valid.csv").read_bytes().decode() == EXPECTED_VALID
    assert (out / "test.csv").read_bytes().decode() == EXPECTED_TEST
    assert stats["skipped"] == EXPECTED_SKIPPED
    assert stats["category"] == "Toys"
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 10)
    assert stats["rows"] == {"train": 5, "valid": 1, "test": 1}
    assert stats["interactions"] == sum(stats["rows"].values()) + stats["users"]
    assert stats["k_core_rounds"] == 4  # u5/u6 dropped, then u3's A9, then u3's A1, then a round with no change
    assert stats["meta_items_with_title"] == 5 and stats["reviews_in_window"] == 14
    assert json.loads((out / "stats.json").read_text()) == stats
    printed = capsys.readouterr().out
    assert "Toys: 3 users, 4 items, 10 interactions" in printed
    assert "reviews:bad_json: 1 (lines 6)" in printed
    assert "items: 4; rows: train 5, valid 1, test 1" in (out / "README.md").read_text()
    data = load_amazon(out)  # the loader accepts the output and validates every row
    assert data.splits["train"]["item_title"][0] == "Beta"
    assert shuffled_item_ids(["A8", "A1", "A3", "A2"], 42) == {"A3": 0, "A2": 1, "A8": 2, "A1": 3}


def test_prepare_cli_and_uncompressed_meta(tmp_path, capsys):
    _, _ = write_raw(tmp_path, gz_meta=False)
    raw = tmp_path / "raw"
    (raw / "meta_Toys.json").rename(raw / "meta_Toys.json.plain")
    out = tmp_path / "cli"
    argv = ["prepare", "--reviews", str(raw / "Toys.json.gz"), "--meta", str(raw / "meta_Toys.json.plain"),
            "--output-dir", str(out), "--start", "2018-01-01", "--end", "2018-02-01", "--k-core", "2",
            "--max-history", "2", "--no-progress", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == ""
    assert (out / "train.csv").read_bytes().decode() == EXPECTED_TRAIN


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    reviews, meta = write_raw(tmp_path)
    assert cli_main(["prepare", "--output-dir", str(tmp_path / "o"), "--raw-dir", str(reviews.parent)]) == 2
    assert "give --reviews and --meta, or --raw-dir with --category" in capsys.readouterr().err
    # no default window for "Toys"
    code = cli_main(["prepare", "--output-dir", str(tmp_path / "o"), "--raw-dir", str(reviews.parent),
                     "--category", "Toys", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "no default time window for category 'Toys'" in capsys.readouterr().err
    code = cli_main(["prepare", "--output-dir", str(tmp_path / "o"), "--raw-dir", str(tmp_path),
                     "--category", "CDs_and_Vinyl"])  # fmt: skip
    assert code == 2 and "CDs_and_Vinyl.json.gz not found" in capsys.readouterr().err


def test_prepare_too_little_data_and_bad_settings(tmp_path):
    reviews, meta = write_raw(tmp_path)
    with pytest.raises(ValueError, match=r"too few for non-empty train/valid/test splits.*outside_time_window"):
        prepare_amazon(reviews, meta, tmp_path / "o", start="2018-01-01", end="2018-02-01", k_core=5,
                       progress=False, verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="start=2018-02-01 must be before end=2018-01-01"):
        prepare_amazon(reviews, meta, tmp_path / "o", start="2018-02-01", end="2018-01-01")
    with pytest.raises(ValueError, match="is not a date"):
        prepare_amazon(reviews, meta, tmp_path / "o", start="01/02/2018", end="2018-01-01")


def test_truncated_gzip_names_file_and_line(tmp_path):
    reviews, meta = write_raw(tmp_path)
    blob = reviews.read_bytes()
    reviews.write_bytes(blob[: len(blob) - 20])  # cut the gzip stream
    with pytest.raises(ValueError, match=r"Toys.json.gz: cannot read past line \d+ .*truncated"):
        prepare_amazon(reviews, meta, tmp_path / "o", start="2018-01-01", end="2018-02-01", k_core=2,
                       progress=False, verbose=False)  # fmt: skip


def test_clean_title():
    assert clean_title('  "Kind of Blue &amp; More"\n') == "Kind of Blue & More"
    assert clean_title("Smokin'") == "Smokin'"  # single quotes are kept (as in the shared data)
    assert clean_title("&amp;Ouml;yster") == "&Ouml;yster"  # unescaped once only
    assert clean_title("A\tB\r\nC") == "A B  C"


def test_k_core_is_iterative():
    # item 9 is shared by users 0 and 1; user 1 has only that interaction -> item 9 falls below 2 -> user 0 too
    user = np.array([0, 0, 1, 2, 2])
    item = np.array([9, 5, 9, 5, 5])
    keep, rounds = k_core_mask(user, item, 2)
    assert keep.tolist() == [False, False, False, True, True] and rounds == 4


def test_build_rows_history_window_and_order():
    user = np.array([0, 0, 0, 1, 1])
    item = np.array([10, 11, 12, 20, 21])
    time = np.array([1, 2, 5, 1, 2])
    line = np.arange(5)
    assert build_rows(user, item, time, line, max_history=1) == [([10], 11), ([20], 21), ([11], 12)]
    assert build_rows(user, item, time, line, max_history=10)[-1] == ([10, 11], 12)
    assert build_rows(user[:0], item[:0], time[:0], line[:0], 10) == []


def test_split_sizes_follow_int_rule():
    rows = list(range(61564))  # CDs: all rows
    parts = split_rows(rows)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [49251, 6156, 6157]
    assert parts["valid"][0] == int(0.8 * 61564)


def test_writer_reproduces_shared_files_byte_for_byte(data_dir, tmp_path):
    src = data_dir / "amazon" / "Movies_and_TV"
    items = read_items(src / "items.tsv")
    splits = {}
    for split in ("train", "valid", "test"):
        cols = read_split(src / f"{split}.csv", items)
        splits[split] = list(zip(cols["history_item_id"], cols["item_id"]))
    write_dataset(tmp_path, items, splits)
    for name in ("items.tsv", "train.csv", "valid.csv", "test.csv"):
        assert filecmp.cmp(src / name, tmp_path / name, shallow=False), name


def test_item_ids_are_a_seeded_shuffle():
    asins = [f"B{i:03d}" for i in range(50)]
    ids = shuffled_item_ids(reversed(asins), 42)
    order = sorted(asins)
    random.Random(42).shuffle(order)
    assert ids == {a: i for i, a in enumerate(order)}
    assert shuffled_item_ids(asins, 1) != ids


def test_help_explains_every_option():
    from dataclasses import fields

    from trl_flower.cli.prepare import PrepareArguments

    text = "".join(make_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for f in fields(PrepareArguments):
        assert "--" + f.name.replace("_", "-") in text
        assert "".join(f.metadata["help"].split()) in text, f.name
    assert "CDs_and_Vinyl:2015-10-01..2018-11-01" in text and "Movies_and_TV:2017-10-01..2018-11-01" in text
