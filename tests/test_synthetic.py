"""The built-in synthetic catalogue: determinism, the Amazon loader's form, popularity skew, sequential signal."""

from __future__ import annotations

import numpy as np
import pytest

from trl_flower.data.amazon import load_amazon
from trl_flower.data.popularity import popularity_from_histories
from trl_flower.data.synthetic import (
    SyntheticSequenceModel,
    make_synthetic,
    save_synthetic,
    synthetic_catalogue,
)

AMAZON_COLUMNS = ["history_item_id", "history_item_title", "item_id", "item_title", "row_index"]


@pytest.fixture(scope="module")
def synthetic():
    """The default-size synthetic data (300 items, 1000 users) and its ground truth; ~1 s to build."""
    return make_synthetic(seed=0, return_catalogue=True)


def _as_lists(data):
    return {name: split.to_dict() for name, split in data.splits.items()}


def test_same_seed_same_data_other_seed_other_data():
    a = make_synthetic(num_items=100, num_users=150, seed=3)
    b = make_synthetic(num_items=100, num_users=150, seed=3)
    c = make_synthetic(num_items=100, num_users=150, seed=4)
    assert a.items == b.items
    assert _as_lists(a) == _as_lists(b)
    assert a.items != c.items
    assert _as_lists(a)["train"]["item_id"] != _as_lists(c)["train"]["item_id"]


def test_amazon_form_columns_and_8_1_1_split(synthetic):
    data, _ = synthetic
    assert data.name == "synthetic"
    assert sorted(data.splits) == ["test", "train", "valid"]
    rows = {name: split.num_rows for name, split in data.splits.items()}
    total = sum(rows.values())
    assert total > 5000
    assert rows["train"] == pytest.approx(0.8 * total, abs=1)
    assert rows["valid"] == pytest.approx(0.1 * total, abs=1)
    for name, split in data.splits.items():
        assert split.column_names == AMAZON_COLUMNS
        cols = split.to_dict()
        assert cols["row_index"] == list(range(split.num_rows))
        for hist_ids, hist_titles, target, title in zip(
            cols["history_item_id"], cols["history_item_title"], cols["item_id"], cols["item_title"]
        ):
            assert 1 <= len(hist_ids) <= 10
            assert hist_titles == [data.items[i] for i in hist_ids]
            assert title == data.items[target]
            assert target not in hist_ids  # users never repeat an item


def test_titles_readable_with_prefixes_and_duplicates(synthetic):
    data, catalogue = synthetic
    titles = data.items
    assert len(titles) == 300
    assert all(2 <= len(t.split()) <= 6 and t == t.strip() for t in titles)
    distinct = set(titles)
    assert 0 < len(titles) - len(distinct) <= 6  # a few duplicate titles, like Amazon's catalogue
    prefixes = [t for t in distinct if any(o != t and o.startswith(t + " ") for o in distinct)]
    assert len(prefixes) >= 5
    # every variant's title starts with its base item's title
    for item in np.flatnonzero(catalogue.variant_of >= 0):
        assert titles[item].startswith(titles[catalogue.variant_of[item]] + " ")


def test_popularity_long_tail(synthetic):
    data, _ = synthetic
    train = data.splits["train"]
    counts = np.bincount([i for h in train["history_item_id"] for i in h], minlength=len(data.items))  # [M]
    ranked = np.sort(counts)[::-1]
    top_decile = ranked[: len(ranked) // 10].sum() / ranked.sum()
    assert top_decile > 0.40
    assert ranked[len(ranked) // 2] < 0.2 * ranked[0]  # median item far below the head
    shares = popularity_from_histories(train["history_item_title"]).shares
    assert np.all(np.diff(shares) <= 0)
    assert shares[0] > 0.35 and shares[-1] < 0.05  # CDs: 0.43 / 0.022


def test_transitions_beat_popularity_on_hr_at_10(synthetic):
    """A genre-transition baseline (top-10 targets after the last item's genre, from train) beats popularity."""
    data, catalogue = synthetic
    M, C = catalogue.num_items, catalogue.num_genres
    train, test = data.splits["train"], data.splits["test"]
    target = np.array(train["item_id"])  # [N]
    last_genre = catalogue.genre[[h[-1] for h in train["history_item_id"]]]  # [N]
    popular_top = np.argsort(-np.bincount(target, minlength=M), kind="stable")[:10]  # [10]
    by_genre = np.zeros((C, M))
    np.add.at(by_genre, (last_genre, target), 1.0)
    genre_top = np.argsort(-by_genre, axis=1, kind="stable")[:, :10]  # [C, 10]

    test_target = np.array(test["item_id"])  # [U]
    test_genre = catalogue.genre[[h[-1] for h in test["history_item_id"]]]  # [U]
    hr_pop = np.isin(test_target, popular_top).mean()
    hr_genre = (genre_top[test_genre] == test_target[:, None]).any(axis=1).mean()
    assert hr_genre > hr_pop + 0.05, (hr_genre, hr_pop)


def test_chronological_split_keeps_time_order():
    """Test rows come after train rows in time: the last train target time <= the first test target time."""
    from trl_flower.data.synthetic import simulate_sequences, split_rows

    catalogue = synthetic_catalogue(num_items=64, num_genres=4, seed=1)
    sequences = simulate_sequences(catalogue, num_users=40, seed=2)
    rows = split_rows(sequences, catalogue.items, return_times=True)
    t = {name: r["time"] for name, r in rows.items()}
    assert sum(len(v) for v in t.values()) == sum(seq.size - 1 for seq, _ in sequences)
    assert t["train"] == sorted(t["train"]) and t["test"] == sorted(t["test"])
    assert max(t["train"]) <= min(t["valid"]) and max(t["valid"]) <= min(t["test"])


def test_save_round_trips_through_the_amazon_loader(tmp_path):
    data = make_synthetic(num_items=80, num_users=60, seed=5)
    loaded = load_amazon(save_synthetic(data, tmp_path / "synthetic"))
    assert loaded.items == data.items
    for name in ("train", "valid", "test"):
        assert loaded.splits[name].to_dict() == data.splits[name].to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_items=10, num_genres=8), "num_items must be >= 4 \\* num_genres"),
        (dict(num_items=100, num_genres=13), "num_genres must be in"),
        (dict(num_items=100, zipf_exponent=-1.0), "zipf_exponent must be >= 0"),
    ],
)
def test_catalogue_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_catalogue(**kwargs)


def test_behaviour_probabilities_are_checked():
    with pytest.raises(ValueError, match="p_stay \\+ p_successor \\+ p_preferred must be <= 1"):
        SyntheticSequenceModel(p_stay=0.8, p_successor=0.3)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        SyntheticSequenceModel(p_global=1.5)
