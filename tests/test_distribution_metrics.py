"""Distribution-fitting divergences (title and token level) against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trl_flower.evaluation.distribution import (
    EPS,
    NOT_IN_DATASET,
    distribution_metrics,
    divergences,
    title_divergences,
    title_histograms,
    token_divergences,
    token_histogram,
)


class CharTokenizer:
    """One token per character (token id = code point); enough to hand-compute token histograms."""

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _kl(p, q):
    p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
    return float(np.sum(p * np.log(p / q)))


def test_divergences_hand_values():
    out = divergences(np.array([1.0, 3.0]), np.array([1.0, 1.0]))  # t = [1/4, 3/4], r = [1/2, 1/2]
    assert out["KL(T||R)"] == pytest.approx(0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5))
    assert out["KL(R||T)"] == pytest.approx(0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75))
    m = np.array([3 / 8, 5 / 8])
    js = 0.5 * (0.5 * np.log(0.5 / m[0]) + 0.5 * np.log(0.5 / m[1])) + 0.5 * (
        0.25 * np.log(0.25 / m[0]) + 0.75 * np.log(0.75 / m[1])
    )
    assert out["JS"] == pytest.approx(js)
    with pytest.raises(ValueError, match="positive"):
        divergences(np.array([1.0, 0.0]), np.array([1.0, 1.0]))


def test_title_level_out_of_set_bucket():
    target = {"A": 3, "B": 1}
    generated = ["A", "A", "B", "X", "Y"]  # X and Y are outside T -> pooled into one bucket
    keys, t, r = title_histograms(generated, target)
    assert keys == ["A", "B", NOT_IN_DATASET]
    np.testing.assert_array_equal(t, [3, 1, EPS])
    np.testing.assert_array_equal(r, [2, 1, 2])
    out = title_divergences(generated, target)
    assert out["KL(T||R)"] == pytest.approx(_kl([3, 1, EPS], [2, 1, 2]))
    assert out["KL(R||T)"] == pytest.approx(_kl([2, 1, 2], [3, 1, EPS]))
    assert out["KL(R||T)"] > 10  # mass on the bucket that T gives only eps: heavily penalised


def test_title_level_missing_target_gets_eps():
    target = {"A": 1, "B": 1, "C": 2}
    out = title_divergences({"A": 4, "C": 4}, target)  # counts mapping; B never generated
    assert out["KL(T||R)"] == pytest.approx(_kl([1, 1, 2, EPS], [4, EPS, 4, EPS]))
    t = np.array([1, 1, 2, EPS]) / (4 + EPS)
    r = np.array([4, EPS, 4, EPS]) / (8 + 2 * EPS)
    m = (t + r) / 2
    assert out["JS"] == pytest.approx(0.5 * np.sum(r * np.log(r / m)) + 0.5 * np.sum(t * np.log(t / m)))


def test_perfect_fit_is_zero_and_js_bounded():
    target = {"A": 5, "B": 3, "C": 2}
    out = title_divergences(["A"] * 5 + ["B"] * 3 + ["C"] * 2, target)
    assert out == pytest.approx({"KL(T||R)": 0.0, "KL(R||T)": 0.0, "JS": 0.0}, abs=1e-12)
    worst = title_divergences(["Z"] * 10, target)
    assert 0 < worst["JS"] <= np.log(2)


def test_token_histogram_counts_every_occurrence():
    ids, w = token_histogram({"ab": 2, "bb": 1}, CharTokenizer())
    assert ids.tolist() == [ord("a"), ord("b")]
    # "ab" x2 -> a:2, b:2; "bb" x1 -> b:2 (the notebook's bug would give b only the last title's count)
    assert w.tolist() == [2.0, 4.0]


def test_token_level_hand_values():
    target = {"ab": 2, "b": 1}  # tokens a:2, b:3
    generated = ["ab", "bb", "c"]  # a:1, b:3, c:1 (out-of-set titles count at token level)
    out = token_divergences(generated, target, CharTokenizer())
    t = [2, 3, EPS]  # ids a, b, c
    r = [1, 3, 1]
    assert out["KL(T||R)"] == pytest.approx(_kl(t, r))
    assert out["KL(R||T)"] == pytest.approx(_kl(r, t))


def test_distribution_metrics_names_and_counts():
    target = {"ab": 2, "b": 1}
    out = distribution_metrics(["ab", "ab", "zz"], target, tokenizer=CharTokenizer())
    assert set(out) == {
        "title_KL(T||R)", "title_KL(R||T)", "title_JS", "token_KL(T||R)", "token_KL(R||T)", "token_JS",
        "num_generated", "out_of_set", "distinct_generated",
    }  # fmt: skip
    assert out["num_generated"] == 3 and out["out_of_set"] == 1 and out["distinct_generated"] == 2
    assert out["title_KL(T||R)"] == pytest.approx(_kl([2, 1, EPS], [2, EPS, 1]))
    assert "token_JS" not in distribution_metrics(["ab"], target)


def test_input_errors():
    with pytest.raises(ValueError, match="no generated titles"):
        title_divergences([], {"A": 1})
    with pytest.raises(ValueError, match="reserved out-of-set bucket"):
        title_divergences(["A"], {NOT_IN_DATASET: 1})
    with pytest.raises(ValueError, match="must be positive"):
        title_divergences(["A"], {"A": 0})


def test_movies_targets_sampling_ranks_fits(data_dir, tiny_tokenizer):
    target = json.loads((data_dir / "movies_popularity" / "movies_100.json").read_text())
    assert len(target) == 100 and sum(target.values()) == 481_042  # flower_reference.md §3.3
    titles = list(target)
    p = np.array([target[t] for t in titles], float)
    rng = np.random.default_rng(0)
    proportional = [titles[i] for i in rng.choice(len(titles), size=2000, p=p / p.sum())]
    uniform = [titles[i] for i in rng.choice(len(titles), size=2000)]
    fit = distribution_metrics(proportional, target, tokenizer=tiny_tokenizer)
    flat = distribution_metrics(uniform, target, tokenizer=tiny_tokenizer)
    assert fit["title_JS"] < flat["title_JS"] and fit["title_KL(T||R)"] < flat["title_KL(T||R)"]
    assert fit["token_JS"] < flat["token_JS"]
