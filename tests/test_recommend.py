"""Tests of batched constrained beam search (`recommend`), constrained sampling and the official JSON export.

All on the tiny random Qwen2 of `conftest.py` over the tiny catalogue (10 titles, 9 distinct token paths: "Blue
Train" is items 3 and 4). The model is random, so the tests check properties that hold for any model: validity,
batch-size invariance, scores equal to an independent teacher-forced computation, isolation from the model's
shipped generation defaults.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from trl_flower.evaluation import generate_path
from trl_flower.evaluation.recommend import Recommendations, export_official_json, recommend, sample_items
from trl_flower.tree import PrefixTree


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; with other jobs on the machine, 2 threads are up to 15x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


WORDS = (
    "The user has enjoyed the following items before: Back to Life, Blue Train, Kind of Blue, Rumours. "
    "Recommend the next item."
).split()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer) -> PrefixTree:
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """16 prompts of 2 to 20 words, so a batch mixes many padding lengths."""
    rng = np.random.default_rng(0)
    return [" ".join(WORDS[: int(n)]) for n in rng.integers(2, len(WORDS), size=16)]


def _teacher_forced_score(model, tokenizer, prompt: str, path: list[int], temperature: float, length_penalty: float):
    """Σ_t log_softmax(log p(y_t | prompt, y_<t) / T) / n ** length_penalty, by one plain forward (no beams)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + path])  # [1, P + n]
    with torch.no_grad():
        logits = model(ids).logits[0, -len(path) - 1 : -1].double()  # [n, V] predicting each path token
    logp = torch.log_softmax(torch.log_softmax(logits, -1) / temperature, -1)
    total = logp.gather(1, torch.tensor(path)[:, None]).sum()
    return float(total / len(path) ** length_penalty)


class TestRecommend:
    def test_batch_size_does_not_change_any_list(self, model, tiny_tokenizer, tree, prompts):
        runs = [
            recommend(model, tiny_tokenizer, prompts, tree, top_k=5, batch_size=b, show_progress=False) for b in (1, 16)
        ]
        for other in runs[1:]:
            np.testing.assert_array_equal(other.item_ids, runs[0].item_ids)
            # only float32 rounding differs (padding changes attention reduction shapes): ~5e-7 here
            np.testing.assert_allclose(other.scores, runs[0].scores, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("batch_size, temperature, length_penalty", [(1, 1.0, 1.0), (16, 1.0, 1.0), (16, 1.5, 0.0)])
    def test_shared_prompt_cache_gives_the_lists_of_plain_generate(
        self, model, tiny_tokenizer, tree, prompts, batch_size, temperature, length_penalty
    ):
        kwargs = dict(top_k=5, num_beams=6, batch_size=batch_size, temperature=temperature, show_progress=False)
        kwargs.update(length_penalty=length_penalty, decoder="generate")
        shared = recommend(model, tiny_tokenizer, prompts, tree, share_prompt_cache=True, **kwargs)
        plain = recommend(model, tiny_tokenizer, prompts, tree, share_prompt_cache=False, **kwargs)
        np.testing.assert_array_equal(shared.item_ids, plain.item_ids)
        np.testing.assert_allclose(shared.scores, plain.scores, atol=1e-5, rtol=0)

    def test_shared_prompt_cache_with_a_peft_model(self, tiny_model_dir, tiny_tokenizer, tree, prompts):
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora).eval()  # random non-zero adapters: the adapter changes the logits
        tokens_embedded = []  # token positions run through the model: fewer when the prompts are shared
        hook = base.get_input_embeddings().register_forward_hook(lambda m, i, o: tokens_embedded.append(i[0].numel()))
        kwargs = dict(top_k=5, batch_size=16, show_progress=False, decoder="generate")
        shared = recommend(peft_model, tiny_tokenizer, prompts, tree, share_prompt_cache=True, **kwargs)
        shared_tokens = sum(tokens_embedded)
        tokens_embedded.clear()
        plain = recommend(peft_model, tiny_tokenizer, prompts, tree, share_prompt_cache=False, **kwargs)
        hook.remove()
        np.testing.assert_array_equal(shared.item_ids, plain.item_ids)
        np.testing.assert_allclose(shared.scores, plain.scores, atol=1e-5, rtol=0)
        assert shared_tokens < sum(tokens_embedded) / 2  # the cache reached generate through the PEFT wrapper

    def test_shared_prompt_cache_is_what_generate_gets(self, model, tiny_tokenizer, tree, prompts, monkeypatch):
        # control for the test above: the cache must really reach generate (else both runs are plain generate)
        seen = []
        original = model.generate

        def spy(*args, **kwargs):
            cache = kwargs.get("past_key_values")  # its length now: generate grows it while decoding
            seen.append(None if cache is None else (cache.get_seq_length(), kwargs["input_ids"].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)
        kwargs = dict(top_k=5, batch_size=3, show_progress=False, decoder="generate")
        recommend(model, tiny_tokenizer, prompts[:3], tree, **kwargs)
        recommend(model, tiny_tokenizer, prompts[:3], tree, share_prompt_cache=False, **kwargs)
        longest = max(len(tiny_tokenizer(p)["input_ids"]) for p in prompts[:3])
        assert seen[0] == (longest - 1, (3, longest))  # every prompt token but the last is cached
        assert seen[1] is None

    def test_lists_are_valid_distinct_and_sorted(self, model, tiny_tokenizer, tree, prompts, tiny_titles):
        recs = recommend(model, tiny_tokenizer, prompts, tree, top_k=9, titles=tiny_titles, show_progress=False)
        assert isinstance(recs, Recommendations)
        assert recs.item_ids.shape == recs.nodes.shape == recs.scores.shape == (16, 9)
        assert recs.item_ids.dtype == np.int64 and (recs.item_ids >= 0).all()
        assert tree.is_terminal[recs.nodes].all()
        for row in recs.nodes:  # K = all 9 distinct titles: each exactly once
            assert len(set(row.tolist())) == 9
        assert (np.diff(recs.scores, axis=1) <= 0).all()
        assert recs.titles[0] == [tiny_titles[i] for i in recs.item_ids[0]]

    def test_duplicate_titles_expose_all_item_ids(self, model, tiny_tokenizer, tree, prompts, tiny_titles):
        recs = recommend(model, tiny_tokenizer, prompts[:2], tree, top_k=9, titles=tiny_titles, show_progress=False)
        u, k = np.argwhere(recs.item_ids == 3)[0]  # "Blue Train" = items 3 and 4, representative 3
        assert recs.titles[u][k] == "Blue Train"
        assert recs.all_item_ids(u, k).tolist() == [3, 4]
        assert 4 not in recs.item_ids

    @pytest.mark.parametrize("temperature, length_penalty", [(1.0, 1.0), (2.5, 1.0), (0.5, 0.0)])
    def test_scores_equal_teacher_forced_scores(
        self, model, tiny_tokenizer, tree, prompts, temperature, length_penalty
    ):
        recs = recommend(
            model,
            tiny_tokenizer,
            prompts[:4],
            tree,
            top_k=3,
            batch_size=4,
            temperature=temperature,
            length_penalty=length_penalty,
            show_progress=False,
        )
        paths, lengths = tree.item_paths(torch.as_tensor(recs.item_ids.reshape(-1)))
        expected = [
            _teacher_forced_score(model, tiny_tokenizer, prompts[i // 3], p[:n].tolist(), temperature, length_penalty)
            for i, (p, n) in enumerate(zip(paths, lengths))
        ]
        np.testing.assert_allclose(recs.scores.reshape(-1), expected, atol=1e-4, rtol=0)

    def test_temperature_reorders_lists(self, model, tiny_tokenizer, tree, prompts):
        base = recommend(model, tiny_tokenizer, prompts, tree, top_k=9, show_progress=False)
        hot = recommend(model, tiny_tokenizer, prompts, tree, top_k=9, temperature=0.05, show_progress=False)
        assert not np.array_equal(base.scores, hot.scores)
        assert not np.array_equal(base.item_ids, hot.item_ids)  # sharper steps favour other titles

    def test_short_budget_leaves_unfinished_beams_without_item(self, model, tiny_tokenizer, tree, prompts, tiny_titles):
        recs = recommend(
            model,
            tiny_tokenizer,
            prompts[:3],
            tree,
            top_k=9,
            max_new_tokens=2,
            titles=tiny_titles,
            show_progress=False,
        )
        unfinished = recs.item_ids == -1
        assert unfinished.any() and (recs.nodes[unfinished] == -1).all()
        assert all(recs.titles[u][k] == "" for u, k in np.argwhere(unfinished))
        assert recs.all_item_ids(*np.argwhere(unfinished)[0]).size == 0

    def test_progress_bar_and_pad_fallback(self, model, tiny_tokenizer, tree, prompts, capsys):
        recs = recommend(model, tiny_tokenizer, prompts[:3], tree, top_k=2, batch_size=2, show_progress=True)
        assert "recommend" in capsys.readouterr().err
        assert (recs.item_ids >= 0).all()

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(top_k=10), r"top_k.*\[1, 9\]"),
            (dict(top_k=3, num_beams=2), "num_beams"),
            (dict(top_k=2, batch_size=0), "batch_size"),
            (dict(top_k=2, max_new_tokens=0), "max_new_tokens"),
            (dict(top_k=2, temperature=0.0), "temperature"),
            (dict(top_k=2, titles=["a", "b"]), "one title per item"),
        ],
    )
    def test_invalid_arguments(self, model, tiny_tokenizer, tree, kwargs, match):
        with pytest.raises(ValueError, match=match):
            recommend(model, tiny_tokenizer, ["The user"], tree, show_progress=False, **kwargs)

    def test_prompts_must_be_a_list_of_strings(self, model, tiny_tokenizer, tree):
        with pytest.raises(ValueError, match="list of strings"):
            recommend(model, tiny_tokenizer, "The user", tree, top_k=2, show_progress=False)
        with pytest.raises(ValueError, match="empty"):
            recommend(model, tiny_tokenizer, [], tree, top_k=2, show_progress=False)


class TestHostileGenerationDefaults:
    """A checkpoint whose generation_config.json samples, penalises and truncates must not change our results."""

    @pytest.fixture(scope="class")
    @classmethod
    def hostile_model(cls, tiny_model_dir, tmp_path_factory, tree):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        title_token = int(tree.token[1])  # a first title token
        model.generation_config = GenerationConfig(
            do_sample=True,
            temperature=5.0,
            top_k=2,
            top_p=0.5,
            min_p=0.3,
            repetition_penalty=10.0,
            no_repeat_ngram_size=1,
            max_length=3,
            min_new_tokens=30,
            num_beams=3,
            num_return_sequences=3,
            length_penalty=-5.0,
            bad_words_ids=[[title_token]],
            suppress_tokens=[title_token],
            pad_token_id=model.config.pad_token_id,
            eos_token_id=model.config.eos_token_id,
        )
        out = tmp_path_factory.mktemp("hostile-model")
        model.save_pretrained(out)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.generation_config.top_k == 2 and loaded.generation_config.min_new_tokens == 30
        return loaded

    @pytest.mark.parametrize("decoder", ["trie", "generate"])
    def test_recommend_ignores_shipped_defaults(self, model, hostile_model, tiny_tokenizer, tree, prompts, decoder):
        kwargs = dict(top_k=4, show_progress=False, decoder=decoder)
        clean = recommend(model, tiny_tokenizer, prompts[:6], tree, **kwargs)
        hostile = recommend(hostile_model, tiny_tokenizer, prompts[:6], tree, **kwargs)
        np.testing.assert_array_equal(hostile.item_ids, clean.item_ids)
        np.testing.assert_allclose(hostile.scores, clean.scores, atol=1e-6, rtol=0)
        assert hostile_model.generation_config.top_k == 2  # restored after the call

    def test_sample_items_ignores_shipped_defaults(self, model, hostile_model, tiny_tokenizer, tree):
        kw = dict(num_samples=50, temperature=1.5, seed=3, show_progress=False)
        clean = sample_items(model, tiny_tokenizer, ["The user"], tree, **kw)
        hostile = sample_items(hostile_model, tiny_tokenizer, ["The user"], tree, **kw)
        np.testing.assert_array_equal(hostile, clean)

    def test_control_the_defaults_do_leak_without_isolation(
        self, model, hostile_model, tiny_tokenizer, tree, prompts, monkeypatch
    ):
        """Without hiding the model's generation_config, its None-only fields (here suppress_tokens and
        bad_words_ids, which have no neutral non-None value) reach generate and change the lists."""
        monkeypatch.setattr(generate_path, "own_generation_defaults", lambda model: contextlib.nullcontext())
        kwargs = dict(top_k=4, show_progress=False, decoder="generate")  # the trie decoder never reads them
        clean = recommend(model, tiny_tokenizer, prompts[:6], tree, **kwargs)
        leaked = recommend(hostile_model, tiny_tokenizer, prompts[:6], tree, **kwargs)
        assert not np.array_equal(leaked.item_ids, clean.item_ids)


class TestSampleItems:
    def test_shape_validity_and_seed(self, model, tiny_tokenizer, tree, prompts):
        state = torch.random.get_rng_state()
        a = sample_items(
            model, tiny_tokenizer, prompts[:3], tree, num_samples=40, batch_size=32, seed=1, show_progress=False
        )
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
        b = sample_items(
            model, tiny_tokenizer, prompts[:3], tree, num_samples=40, batch_size=32, seed=1, show_progress=False
        )
        c = sample_items(
            model, tiny_tokenizer, prompts[:3], tree, num_samples=40, batch_size=32, seed=2, show_progress=False
        )
        assert a.shape == (3, 40) and a.dtype == np.int64
        assert tree.is_terminal[tree.item_node[a]].all() and (a >= 0).all()
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        assert 4 not in a  # duplicate titles are reported by their representative id

    @pytest.mark.parametrize("prompt_count, num_samples, batch_size", [(3, 40, 32), (1, 50, 16)])
    def test_shared_prompt_cache_gives_the_draws_of_plain_generate(
        self, model, tiny_tokenizer, tree, prompts, prompt_count, num_samples, batch_size
    ):
        # (3, 40, 32): batches span prompt boundaries with uneven counts; (1, 50, 16): RQ1's one history-free prompt
        kwargs = dict(num_samples=num_samples, batch_size=batch_size, temperature=1.5, seed=3, show_progress=False)
        shared = sample_items(model, tiny_tokenizer, prompts[:prompt_count], tree, share_prompt_cache=True, **kwargs)
        plain = sample_items(model, tiny_tokenizer, prompts[:prompt_count], tree, share_prompt_cache=False, **kwargs)
        np.testing.assert_array_equal(shared, plain)

    def test_shared_prompt_cache_reaches_generate_only_when_prompts_repeat(
        self, model, tiny_tokenizer, tree, prompts, monkeypatch
    ):
        # control for the test above: else both runs could be plain generate
        seen = []
        original = model.generate

        def spy(*args, **kwargs):
            cache = kwargs.get("past_key_values")  # its length now: generate grows it while decoding
            seen.append(None if cache is None else (cache.get_seq_length(), kwargs["input_ids"].shape[0]))
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)
        sample_items(model, tiny_tokenizer, prompts[:2], tree, num_samples=3, batch_size=6, show_progress=False)
        sample_items(model, tiny_tokenizer, prompts[:2], tree, num_samples=1, batch_size=6, show_progress=False)
        sample_items(
            model,
            tiny_tokenizer,
            prompts[:2],
            tree,
            num_samples=3,
            batch_size=6,
            show_progress=False,
            share_prompt_cache=False,
        )
        longest = max(len(tiny_tokenizer(p)["input_ids"]) for p in prompts[:2])
        assert seen == [(longest - 1, 6), None, None]  # 2 prompts encoded for 6 rows; no repeat; switched off

    def test_positive_flow_only_never_samples_zero_reward_items(self, model, tiny_tokenizer, tree):
        rewards = np.ones(tree.num_items)
        rewards[[0, 5, 8]] = 0.0
        items = sample_items(
            model,
            tiny_tokenizer,
            ["The user"],
            tree.with_rewards(rewards),
            num_samples=200,
            temperature=2.0,
            positive_flow_only=True,
            show_progress=False,
        )
        assert not np.isin(items, [0, 5, 8]).any()
        assert len(np.unique(items)) == 6  # the 7 positive items minus the duplicate title id 4

    def test_invalid_num_samples(self, model, tiny_tokenizer, tree):
        with pytest.raises(ValueError, match="num_samples"):
            sample_items(model, tiny_tokenizer, ["The user"], tree, num_samples=0)


def _calc_py_hits(rows: list[dict]) -> list[int]:
    """Rank of the target in each row as the authors' calc.py computes it (strip rules, last match wins)."""
    ranks = []
    for row in rows:
        predict = [p.strip(": \n").strip(" \n").strip('"').strip(" ") for p in row["predict"]]
        target = row["output"].strip(" \n")
        ranks.append(max((i for i, p in enumerate(predict) if p == target), default=-1))
    return ranks


def test_export_official_json(model, tiny_tokenizer, tree, prompts, tiny_titles, tmp_path):
    recs = recommend(model, tiny_tokenizer, prompts[:3], tree, top_k=3, titles=tiny_titles, show_progress=False)
    targets = [recs.titles[0][1], "Not A Title", recs.titles[2][0]]
    path = tmp_path / "official.json"
    export_official_json(recs, targets, path, prompts=prompts[:3])
    rows = json.loads(path.read_text())
    assert [sorted(r) for r in rows] == [["input", "output", "predict", "predict_score"]] * 3
    assert rows[0]["predict"] == recs.titles[0] and rows[1]["output"] == "Not A Title"
    assert rows[2]["input"] == prompts[2]
    np.testing.assert_allclose([r["predict_score"] for r in rows], recs.scores, rtol=1e-6)
    assert _calc_py_hits(rows) == [1, -1, 0]


def test_export_official_json_needs_titles(model, tiny_tokenizer, tree, tmp_path):
    recs = recommend(model, tiny_tokenizer, ["The user"], tree, top_k=2, show_progress=False)
    with pytest.raises(ValueError, match="titles="):
        export_official_json(recs, ["x"], tmp_path / "x.json")
