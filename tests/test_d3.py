"""D3 guidance (`trl_flower.baselines.d3`) and the Temp baseline's beam scores.

Hand-built tree: items 0: [5, 6, 2], 1: [5, 2], 2: [7, 2], 3: [5, 8, 2] (terminator 2), SASRec probabilities
p = [0.1, 0.2, 0.3, 0.4]. The masses are P(5) = 0.7, P(7) = 0.3; under 5: P(6) = 0.1, P(2) = 0.2, P(8) = 0.4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_flower.baselines.d3 import D3GuidanceProcessor, recommend_d3
from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.evaluation.recommend import recommend
from trl_flower.tree import PrefixTree

V = 10
PATHS = [[5, 6, 2], [5, 2], [7, 2], [5, 8, 2]]
PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)


@pytest.fixture(scope="module")
def tree():
    return PrefixTree.from_token_paths(PATHS, terminator_id=2)


def masked_uniform(tree, input_ids):
    """Uniform model log-probs log(1/V), masked by the trie (as in beam search)."""
    return TrieLogitsProcessor(tree, prompt_length=1)(input_ids, torch.full((input_ids.shape[0], V), -math.log(V)))


@pytest.mark.parametrize("g", [0.0, 0.5, 2.0])
def test_guided_scores_equal_formula(tree, g):
    s = -math.log(V)
    # row 0: at the root; row 1: after token 5 (two beams of one prompt: probs row shared)
    input_ids = torch.tensor([[0], [0]])
    root = masked_uniform(tree, input_ids)
    out = D3GuidanceProcessor(tree, PROBS, g, prompt_length=1)(input_ids, root)
    expected = {5: math.log(0.7), 7: math.log(0.3)}  # cf at the root
    for token, cf in expected.items():
        assert out[0, token].item() == pytest.approx(g * (s - cf) + cf, abs=1e-6)
    assert torch.isinf(out[0, [0, 1, 2, 3, 4, 6, 8, 9]]).all()

    step = torch.tensor([[0, 5], [0, 7]])
    scores = masked_uniform(tree, step)
    out = D3GuidanceProcessor(tree, PROBS, g, prompt_length=1)(step, scores)
    for token, mass in {2: 0.2, 6: 0.1, 8: 0.4}.items():
        cf = math.log(mass / 0.7)
        assert out[0, token].item() == pytest.approx(g * (s - cf) + cf, abs=1e-6)
    assert out[1, 2].item() == pytest.approx(g * s, abs=1e-6)  # a single child: cf = log 1 = 0
    assert out[1].isfinite().sum() == 1


def test_scale_one_is_the_official_no_op(tree):
    input_ids = torch.tensor([[0, 5]])
    scores = masked_uniform(tree, input_ids)
    scores[0, 6] += 1.0  # the model prefers item 0's branch
    out = D3GuidanceProcessor(tree, PROBS, 1.0, prompt_length=1)(input_ids, scores)
    assert torch.equal(out, scores)


def test_guidance_below_one_moves_ranking_towards_sasrec(tree):
    input_ids = torch.tensor([[0, 5]])
    scores = masked_uniform(tree, input_ids)
    scores[0, 6] += 1.0  # model: token 6 (SASRec mass 0.1) beats 8 (mass 0.4) by 1 nat
    before = scores.clone()
    out = D3GuidanceProcessor(tree, PROBS, 0.3, prompt_length=1)(input_ids, scores)
    assert torch.equal(scores, before)  # not in place
    assert scores[0, 6] > scores[0, 8]  # the model alone ranks 6 first
    assert out[0, 8] > out[0, 6]  # 0.3 · 1 < 0.7 · log 4: SASRec's favourite wins
    # g > 1 extrapolates away from SASRec: the gap in favour of 6 grows
    away = D3GuidanceProcessor(tree, PROBS, 2.0, prompt_length=1)(input_ids, scores)
    assert (away[0, 6] - away[0, 8]) > (scores[0, 6] - scores[0, 8])


def test_validation(tree):
    with pytest.raises(ValueError, match="item_probs"):
        D3GuidanceProcessor(tree, torch.ones(1, 3), 0.5, prompt_length=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        D3GuidanceProcessor(tree, PROBS, -1.0, prompt_length=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_recommend_d3_pure_guidance_follows_each_rows_sasrec(tiny_model, tiny_tokenizer, tiny_titles):
    """g = 0 and no length penalty: a beam's score telescopes to log p_u(item), so the top-1 is SASRec's favourite
    of that row, even though `recommend` reorders the prompts (different lengths) and beams are reordered."""
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
    prompts = [
        "The user has enjoyed Blue Train. Recommend the next item.",
        "The user has enjoyed the following items before: Kind of Blue, Rumours. Recommend the next item.",
        "Recommend the next item.",
    ]
    favourite = [8, 2, 6]
    logits = np.zeros((3, len(tiny_titles)))
    logits[np.arange(3), favourite] = 8.0
    recs = recommend_d3(
        tiny_model, tiny_tokenizer, prompts, tree, logits, guidance_scale=0.0, top_k=3, batch_size=3, titles=tiny_titles
    )
    assert recs.item_ids[:, 0].tolist() == favourite
    p = np.exp(8.0) / (np.exp(8.0) + len(tiny_titles) - 1)
    np.testing.assert_allclose(recs.scores[:, 0], np.log(p), atol=1e-4)
    # g = 1 is plain beam search with length_penalty 0
    plain = recommend(tiny_model, tiny_tokenizer, prompts, tree, top_k=3, length_penalty=0.0, show_progress=False)
    same = recommend_d3(tiny_model, tiny_tokenizer, prompts, tree, logits, guidance_scale=1.0, top_k=3)
    np.testing.assert_array_equal(same.item_ids, plain.item_ids)
    np.testing.assert_allclose(same.scores, plain.scores, atol=1e-5)


def test_recommend_d3_same_lists_with_and_without_the_shared_prompt_cache(tiny_model, tiny_tokenizer, tiny_titles):
    """The guided wrapper runs `recommend`'s prompt prefill through the model; mixed guidance, mixed lengths."""
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
    prompts = [
        "The user has enjoyed Blue Train. Recommend the next item.",
        "The user has enjoyed the following items before: Kind of Blue, Rumours. Recommend the next item.",
        "Recommend the next item.",
    ]
    logits = np.random.default_rng(0).normal(size=(3, len(tiny_titles)))
    runs = [
        recommend_d3(
            tiny_model,
            tiny_tokenizer,
            prompts,
            tree,
            logits,
            guidance_scale=0.5,
            top_k=3,
            share_prompt_cache=shared,
            decoder="generate",
        )
        for shared in (True, False)
    ]
    np.testing.assert_array_equal(runs[0].item_ids, runs[1].item_ids)
    np.testing.assert_allclose(runs[0].scores, runs[1].scores, atol=1e-5)


def test_temperature_beam_scores(tiny_model, tiny_tokenizer, tiny_titles):
    """Temp: a returned beam's score = Σ_t log_softmax(log p_t / T)[a_t] / n (length penalty 1), by teacher forcing."""
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
    prompt = "The user has enjoyed Blue Train. Recommend the next item."
    T = 1.5
    hot = recommend(tiny_model, tiny_tokenizer, [prompt], tree, top_k=3, temperature=T, show_progress=False)
    cold = recommend(tiny_model, tiny_tokenizer, [prompt], tree, top_k=3, show_progress=False)
    assert not np.allclose(hot.scores, cold.scores)
    ids = tiny_tokenizer(prompt)["input_ids"]
    for rank in range(3):
        path, n = tree.item_paths(torch.tensor([int(hot.item_ids[0, rank])]))
        path = path[0, : int(n[0])].tolist()
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids + path])).logits[0, len(ids) - 1 : -1].double()  # [n, V]
        logp = torch.log_softmax(torch.log_softmax(logits, -1) / T, -1)
        expected = logp[torch.arange(len(path)), torch.tensor(path)].sum().item() / len(path)
        assert hot.scores[0, rank] == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ trl-flower evaluate --decoding


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, tiny_titles):
    """Amazon-format splits over the tiny catalogue and test-split SASRec logits that favour each row's target."""
    import csv
    import json

    out = tmp_path_factory.mktemp("data") / "Tiny_Items"
    out.mkdir()
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(tiny_titles)))
    rng = np.random.default_rng(1)
    n = len(tiny_titles)
    rows = [(rng.integers(0, n, size=2).tolist(), int(rng.integers(0, n))) for _ in range(6)]
    rows[0] = (list(range(n)), 0)
    for name in ("train", "valid", "test"):
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            for history, target in rows:
                writer.writerow(
                    [json.dumps(history), json.dumps([tiny_titles[i] for i in history]), target, tiny_titles[target]]
                )
    logits = np.zeros((len(rows), n), dtype=np.float32)
    logits[np.arange(len(rows)), [t for _, t in rows]] = 10.0
    np.save(out / "test_logits.npy", logits)
    return out


def evaluate_cli(argv):
    from trl_flower.cli.evaluate import main

    return main(argv)


def test_evaluate_decoding_d3_and_temp(tiny_model_dir, eval_data, tmp_path, capsys):
    import json

    base = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(eval_data),
        "--category",
        "items",
        "--top-k",
        "3",
        "--rebuild-tree",  # the tiny model has no saved tree
        "--num-threads",
        "1",
        "--no-progress",
    ]
    # g = 0: the beams follow SASRec, which puts almost all mass on each row's target: HR@1 = 1
    assert (
        evaluate_cli(
            [
                *base,
                "--decoding",
                "d3",
                "--sasrec-logits",
                str(eval_data / "test_logits.npy"),
                "--guidance-scale",
                "0",
                "--output-dir",
                str(tmp_path / "d3"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "d3" / "metrics.json").read_text())
    metrics = next(iter(report["results"].values()))
    assert metrics["HR@1"] == 1.0
    assert report["settings"]["length_penalty"] == 0.0 and report["settings"]["decoding"] == "d3"
    assert (
        evaluate_cli([*base, "--decoding", "temp", "--temperature", "1.5", "--output-dir", str(tmp_path / "temp")]) == 0
    )
    capsys.readouterr()
    errors = [
        (["--decoding", "temp"], "--temperature != 1"),
        (["--decoding", "d3"], "needs --sasrec-logits"),
        (["--guidance-scale", "0.5"], "only used with --decoding d3"),
        (
            [
                "--decoding",
                "d3",
                "--sasrec-logits",
                str(eval_data / "test_logits.npy"),
                "--guidance-scale",
                "0.5",
                "--length-penalty",
                "0.5",
            ],
            "length penalty 0",
        ),
    ]
    for extra, message in errors:
        assert evaluate_cli([*base, *extra, "--output-dir", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
