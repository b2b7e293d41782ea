"""Recommendation metrics against hand-computed values (expected values written as formulas)."""

from __future__ import annotations

import numpy as np
import pytest

from trl_flower.data.popularity import popularity_groups
from trl_flower.evaluation.metrics import (
    group_fairness_at_k,
    hit_matrix,
    hit_ranks,
    hr_ndcg_at_k,
    invalid_count,
    recommendation_metrics,
    word_diversity,
)


def _hits(ranks, k=10):
    """A [U, k] hit matrix with one hit per user at the given 0-based rank (None = miss)."""
    hits = np.zeros((len(ranks), k), dtype=bool)
    for u, r in enumerate(ranks):
        if r is not None:
            hits[u, r] = True
    return hits


def test_hr_ndcg_hand_built_hit_matrix():
    # users hit at ranks 0, 2, 7 and not at all
    out = hr_ndcg_at_k(_hits([0, 2, 7, None]))
    expected = {
        "HR@1": 1 / 4,
        "NDCG@1": 1 / 4,
        "HR@3": 2 / 4,
        "NDCG@3": (1 + 1 / np.log2(4)) / 4,
        "HR@5": 2 / 4,
        "NDCG@5": (1 + 1 / np.log2(4)) / 4,
        "HR@10": 3 / 4,
        "NDCG@10": (1 + 1 / np.log2(4) + 1 / np.log2(9)) / 4,
    }
    assert list(out) == list(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_ndcg_rank_one_and_four():
    out = hr_ndcg_at_k(_hits([1, 4], k=5), ks=(1, 2, 5))
    assert out["HR@1"] == 0 and out["NDCG@1"] == 0
    assert out["NDCG@2"] == pytest.approx((1 / np.log2(3)) / 2)
    assert out["NDCG@5"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(6)) / 2)
    assert out["HR@5"] == 1.0


def test_duplicate_target_first_and_last_rank():
    hits = np.zeros((1, 10), dtype=bool)
    hits[0, [1, 4]] = True  # the target title was recommended at ranks 1 and 4
    assert hit_ranks(hits).tolist() == [1]
    assert hit_ranks(hits, duplicate_rank="last").tolist() == [4]
    first = hr_ndcg_at_k(hits, ks=(3, 10))
    last = hr_ndcg_at_k(hits, ks=(3, 10), duplicate_rank="last")
    assert first["HR@3"] == 1 and first["NDCG@10"] == pytest.approx(1 / np.log2(3))
    assert last["HR@3"] == 0 and last["NDCG@10"] == pytest.approx(1 / np.log2(6))
    with pytest.raises(ValueError, match="duplicate_rank"):
        hit_ranks(hits, duplicate_rank="middle")


def test_hit_matrix_from_titles_and_shape_errors():
    hits = hit_matrix([["a", "b", "c"], ["c", "c", "d"]], ["b", "c"])
    assert hits.tolist() == [[False, True, False], [True, True, False]]
    with pytest.raises(ValueError, match="2 recommendation lists but 3 targets"):
        hit_matrix([["a"], ["b"]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="rectangular"):
        hit_matrix([["a", "b"], ["c"]], ["a", "c"])
    with pytest.raises(ValueError, match=r"cut-offs \[20\] are outside 1..10"):
        hr_ndcg_at_k(_hits([0]), ks=(5, 20))


def test_vectorised_matches_plain_loop():
    rng = np.random.default_rng(0)
    vocab = np.array([f"t{i}" for i in range(15)])
    rec = vocab[rng.integers(0, 15, size=(300, 10))]  # duplicates inside lists happen
    targets = vocab[rng.integers(0, 15, size=300)]
    out = hr_ndcg_at_k(hit_matrix(rec, targets))
    for k in (1, 3, 5, 10):
        hr = ndcg = 0.0
        for row, target in zip(rec.tolist(), targets.tolist()):
            if target in row[:k]:
                r = row.index(target)
                hr += 1
                ndcg += 1 / np.log2(r + 2)
        assert out[f"HR@{k}"] == pytest.approx(hr / 300)
        assert out[f"NDCG@{k}"] == pytest.approx(ndcg / 300)


@pytest.fixture
def two_groups():
    # sorted by count: a(6) b(2) | c(1) d(1)  ->  q = [8/10, 2/10]
    return popularity_groups({"a": 6, "b": 2, "c": 1, "d": 1}, num_groups=2)


CATALOGUE = ["a", "b", "c", "d", "e"]  # "e" is a catalogue title outside every group; "zz" is not a title


def test_dgu_mgu_hand_example(two_groups):
    rec = [["a", "c", "e"], ["zz", "b", "a"]]
    out = group_fairness_at_k(rec, two_groups, CATALOGUE, ks=(1, 3))
    # @3: valid titles a c e | b a -> group 0: a, b, a (3); group 1: c, e (e counted in the least popular group)
    p3 = np.array([3 / 5, 2 / 5])
    d3 = p3 - np.array([8 / 10, 2 / 10])
    assert out["group_shares@3"] == pytest.approx(p3.tolist())
    assert out["DGU@3"] == pytest.approx(d3.max() - d3.min())
    assert out["MGU@3"] == pytest.approx(np.abs(d3).mean())
    # @1: a | zz (invalid, excluded) -> p = [1, 0]
    d1 = np.array([1 - 8 / 10, 0 - 2 / 10])
    assert out["DGU@1"] == pytest.approx(d1.max() - d1.min())
    assert out["MGU@1"] == pytest.approx(np.abs(d1).mean())


def test_reference_group7_bug_option(two_groups):
    rec = [["a", "c", "e"], ["zz", "b", "a"]]
    out = group_fairness_at_k(rec, two_groups, CATALOGUE, ks=(3,), reference_group7_bug=True)
    # "e" resets the least popular group's count to 1, so the earlier "c" is lost: counts [3, 1]
    d = np.array([3 / 4 - 8 / 10, 1 / 4 - 2 / 10])
    assert out["group_shares@3"] == pytest.approx([3 / 4, 1 / 4])
    assert out["DGU@3"] == pytest.approx(d.max() - d.min())
    assert out["MGU@3"] == pytest.approx(np.abs(d).mean())
    # a group-1 title after the reset is counted on top of the 1
    rec2 = [["e", "c", "d"]]
    assert group_fairness_at_k(rec2, two_groups, CATALOGUE, ks=(3,), reference_group7_bug=True)[
        "group_shares@3"
    ] == pytest.approx([0.0, 1.0])
    rec3 = [["c", "d", "e", "a"]]  # two group-1 titles before the reset are lost: counts [1, 1]
    bug = group_fairness_at_k(rec3, two_groups, CATALOGUE, ks=(4,), reference_group7_bug=True)
    fixed = group_fairness_at_k(rec3, two_groups, CATALOGUE, ks=(4,))
    assert bug["group_shares@4"] == pytest.approx([1 / 2, 1 / 2])
    assert fixed["group_shares@4"] == pytest.approx([1 / 4, 3 / 4])


def test_dgu_mgu_eight_groups():
    # 16 titles with counts 16..1 -> 8 groups of 2; group g holds counts 16-2g and 15-2g: q_g = (31 - 4g) / 136
    counts = {f"t{i}": 16 - i for i in range(16)}
    pop = popularity_groups(counts)
    g = np.arange(8)
    np.testing.assert_allclose(pop.shares, (31 - 4 * g) / 136)
    rec = [[f"t{i}" for i in range(8)], [f"t{i}" for i in range(8, 16)]]  # every title once: p_g = 1/8
    out = group_fairness_at_k(rec, pop, counts, ks=(8,))
    diff = 1 / 8 - (31 - 4 * g) / 136
    assert out["DGU@8"] == pytest.approx(diff.max() - diff.min())
    assert out["DGU@8"] == pytest.approx(28 / 136)
    assert out["MGU@8"] == pytest.approx(np.mean(np.abs(diff)))


def test_no_valid_titles_gives_nan(two_groups):
    out = group_fairness_at_k([["zz"]], two_groups, CATALOGUE, ks=(1,))
    assert np.isnan(out["DGU@1"]) and np.isnan(out["MGU@1"])


def test_word_diversity_hand_example():
    h, ttr = word_diversity(["a b", "a  c"])  # words a, b, a, c
    assert h == pytest.approx(-(0.5 * np.log2(0.5) + 2 * 0.25 * np.log2(0.25)))
    assert h == pytest.approx(1.5)
    assert ttr == pytest.approx(3 / 4)
    h1, ttr1 = word_diversity(["x x x x"])
    assert h1 == 0.0 and ttr1 == pytest.approx(1 / 4)
    assert all(np.isnan(v) for v in word_diversity(["", " "]))


def test_invalid_count():
    assert invalid_count([["a", "zz", "zz"], ["", "b", "a"]], CATALOGUE) == 3


def test_recommendation_metrics_all_keys(two_groups):
    rec = [["b", "a", "b"], ["zz", "c", "e"]]
    targets = ["b", "e"]
    out = recommendation_metrics(rec, targets, two_groups, CATALOGUE, ks=(1, 3), fairness_ks=(3,))
    assert list(out) == [
        "HR@1", "NDCG@1", "HR@3", "NDCG@3", "DGU@3", "MGU@3", "H", "TTR", "invalid", "distinct_titles", "num_users",
    ]  # fmt: skip
    assert out["HR@1"] == 1 / 2 and out["HR@3"] == 1
    assert out["NDCG@3"] == pytest.approx((1 + 1 / np.log2(4)) / 2)
    d = np.array([3 / 5 - 8 / 10, 2 / 5 - 2 / 10])  # valid: b a b | c e
    assert out["DGU@3"] == pytest.approx(d.max() - d.min()) and out["MGU@3"] == pytest.approx(np.abs(d).mean())
    f = np.array([2, 1, 1, 1, 1]) / 6  # words b a b zz c e
    assert out["H"] == pytest.approx(-(f * np.log2(f)).sum())
    assert out["TTR"] == pytest.approx(5 / 6)
    assert out["invalid"] == 1 and out["distinct_titles"] == 5 and out["num_users"] == 2
    # the official options reach the helpers
    last = recommendation_metrics(rec, targets, two_groups, CATALOGUE, ks=(1,), fairness_ks=(3,),
                                  duplicate_rank="last", reference_group7_bug=True)  # fmt: skip
    assert last["HR@1"] == 0  # "b" found again at rank 2
    d_bug = np.array([3 / 4 - 8 / 10, 1 / 4 - 2 / 10])  # "e" resets group 1 after "c"
    assert last["MGU@3"] == pytest.approx(np.abs(d_bug).mean())


def run_doc_blocks(path) -> int:
    """Execute a markdown file's ```python blocks in one namespace; a `print(...)` followed by `# ` comment lines
    must print exactly those lines (whitespace-normalised). Returns the number of checked outputs."""
    import contextlib
    import io
    import re

    checked = 0
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block, str(path), "exec"), namespace)
        expected = re.findall(r"^print\(.*\n((?:# .*\n)+)", block, re.M)
        if expected:
            want = " ".join(line[2:] for line in expected[0].splitlines())
            assert " ".join(buffer.getvalue().split()) == " ".join(want.split()), path
            checked += 1
    return checked


def test_docs_metrics_examples_run_and_print_what_they_say():
    from pathlib import Path

    assert run_doc_blocks(Path(__file__).resolve().parents[1] / "docs" / "metrics.md") == 3
