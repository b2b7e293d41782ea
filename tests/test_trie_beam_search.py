"""The trie beam search (`recommend(decoder="trie")`, the default) against the `generate` path, and its parts.

Tiny random Qwen2 and catalogue of `conftest.py`: "Back to Life" is a prefix of "Back to Life Again" (its path ends
where the other continues), "Blue Train" is items 3 and 4 (one path). Every equality test has a control showing
that the compared setting really changes the lists, so it cannot pass by comparing a thing with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from trl_flower.baselines.d3 import recommend_d3
from trl_flower.evaluation import output_head
from trl_flower.evaluation.output_head import ModelParts, chunk_columns, edge_logits, log_normalizer, split_model
from trl_flower.evaluation.recommend import recommend
from trl_flower.tree import PrefixTree

WORDS = (
    "The user has enjoyed the following items before: Back to Life, Blue Train, Kind of Blue, Rumours. "
    "Recommend the next item."
).split()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer) -> PrefixTree:
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """16 prompts of 2 to 20 words: unequal lengths, so every batch is left-padded."""
    rng = np.random.default_rng(0)
    return [" ".join(WORDS[: int(n)]) for n in rng.integers(2, len(WORDS), size=16)]


def both(model, tokenizer, prompts, tree, **kwargs):
    """(trie, generate) recommendations with the same settings."""
    kwargs.setdefault("show_progress", False)
    return (
        recommend(model, tokenizer, prompts, tree, decoder="trie", **kwargs),
        recommend(model, tokenizer, prompts, tree, decoder="generate", **kwargs),
    )


def assert_same(trie, gen):
    np.testing.assert_array_equal(trie.item_ids, gen.item_ids)
    np.testing.assert_array_equal(trie.nodes, gen.nodes)
    # float32 rounding only: the normaliser is summed in another order (~1e-6); generate's own change between
    # batch sizes is the same size
    np.testing.assert_allclose(trie.scores, gen.scores, atol=2e-5, rtol=0)


SETTINGS = {
    "reference": dict(top_k=5),
    "all titles": dict(top_k=9),  # K = every distinct path: duplicate and prefix titles must all come out
    "more beams": dict(top_k=4, num_beams=7),
    "temperature": dict(top_k=5, temperature=1.7),
    "sharp temperature": dict(top_k=9, temperature=0.05),
    "length penalty 0": dict(top_k=5, length_penalty=0.0),
    "temperature, no penalty": dict(top_k=6, num_beams=8, temperature=2.5, length_penalty=0.0),
    "cut by the budget": dict(top_k=6, max_new_tokens=3),
}


class TestSameListsAsGenerate:
    @pytest.mark.parametrize("batch_size", [1, 5, 16])
    @pytest.mark.parametrize("setting", list(SETTINGS))
    def test_identical(self, model, tiny_tokenizer, tree, prompts, setting, batch_size):
        trie, gen = both(model, tiny_tokenizer, prompts, tree, batch_size=batch_size, **SETTINGS[setting])
        assert_same(trie, gen)

    def test_control_the_settings_change_the_lists(self, model, tiny_tokenizer, tree, prompts):
        runs = {
            name: recommend(model, tiny_tokenizer, prompts, tree, show_progress=False, **kw)
            for name, kw in SETTINGS.items()
        }
        ref = runs["reference"].item_ids
        assert not np.allclose(runs["temperature"].scores, runs["reference"].scores, atol=1e-2)
        assert not np.array_equal(runs["length penalty 0"].item_ids, ref)
        assert not np.array_equal(runs["sharp temperature"].item_ids[:, :5], ref)
        assert (runs["cut by the budget"].item_ids == -1).any()  # the budget really cuts paths
        assert not np.array_equal(runs["more beams"].item_ids, runs["reference"].item_ids[:, :4])

    def test_control_prefix_and_duplicate_titles_are_in_the_lists(self, model, tiny_tokenizer, tree, prompts):
        recs = recommend(model, tiny_tokenizer, prompts, tree, top_k=9, show_progress=False)
        assert {0, 1, 3} <= set(recs.item_ids.ravel().tolist())  # "Back to Life" (+ "Again"), "Blue Train"
        assert 4 not in recs.item_ids and tree.item_node[3] == tree.item_node[4]
        for row in recs.nodes:  # every distinct path exactly once
            assert sorted(row.tolist()) == sorted(set(tree.item_node.tolist()))

    def test_batch_size_does_not_change_the_lists(self, model, tiny_tokenizer, tree, prompts):
        runs = [
            recommend(model, tiny_tokenizer, prompts, tree, top_k=5, batch_size=b, show_progress=False)
            for b in (1, 3, 16)
        ]
        for other in runs[1:]:
            np.testing.assert_array_equal(other.item_ids, runs[0].item_ids)
            np.testing.assert_allclose(other.scores, runs[0].scores, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("g", [0.0, 0.5, 2.0])
    def test_d3_guidance(self, model, tiny_tokenizer, tree, prompts, tiny_titles, g):
        logits = np.random.default_rng(1).normal(scale=2.0, size=(len(prompts), len(tiny_titles)))
        kwargs = dict(top_k=5, batch_size=6)
        trie = recommend_d3(model, tiny_tokenizer, prompts, tree, logits, g, decoder="trie", **kwargs)
        gen = recommend_d3(model, tiny_tokenizer, prompts, tree, logits, g, decoder="generate", **kwargs)
        assert_same(trie, gen)
        plain = recommend(model, tiny_tokenizer, prompts, tree, top_k=5, length_penalty=0.0, show_progress=False)
        assert not np.array_equal(trie.item_ids, plain.item_ids)  # control: the guidance acts

    def test_peft_model(self, tiny_model_dir, tiny_tokenizer, tree, prompts):
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora).eval()
        assert split_model(peft_model) is not None  # the trie decoder really runs (no fallback)
        trie, gen = both(peft_model, tiny_tokenizer, prompts, tree, top_k=5, batch_size=16)
        assert_same(trie, gen)
        with peft_model.disable_adapter():
            no_adapter = recommend(peft_model, tiny_tokenizer, prompts, tree, top_k=5, show_progress=False)
        assert not np.array_equal(no_adapter.scores, trie.scores)  # control: the adapter is applied


class TestTies:
    """Exactly tied candidates: two titles whose distinguishing tokens have identical embeddings (tied head)."""

    @pytest.fixture(scope="class")
    @classmethod
    def tied(cls, tiny_model_dir, tiny_tokenizer):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        a, b = 40, 41  # token b becomes a copy of a: same logit everywhere, same hidden state after it
        with torch.no_grad():
            model.get_input_embeddings().weight[b] = model.get_input_embeddings().weight[a]
        assert torch.equal(model.lm_head.weight[a], model.lm_head.weight[b])  # tied embeddings
        eos = tiny_tokenizer.eos_token_id
        paths = [[b, 50, eos], [a, 50, eos], [60, eos], [61, 62, eos], [63, eos], [a, 51, eos], [b, 51, eos]]
        return model, PrefixTree.from_token_paths(paths, terminator_id=eos)

    def test_ties_break_by_the_lower_flat_index(self, tied, tiny_tokenizer, prompts):
        model, tree = tied
        recs = recommend(model, tiny_tokenizer, prompts[:4], tree, top_k=7, show_progress=False)
        for row, scores in zip(recs.item_ids.tolist(), recs.scores.tolist()):
            for via_b, via_a in ((0, 1), (6, 5)):  # each pair: same score, token a (lower id) ranked first
                assert scores[row.index(via_b)] == scores[row.index(via_a)]
                assert row.index(via_a) < row.index(via_b)

    def test_same_ranking_as_generate_up_to_the_order_of_exact_ties(self, tied, tiny_tokenizer, prompts):
        """torch's CPU topk promises no order among equal values, so generate may list a tied pair either way."""
        model, tree = tied
        trie, gen = both(model, tiny_tokenizer, prompts[:4], tree, top_k=7, batch_size=4)
        np.testing.assert_allclose(trie.scores, gen.scores, atol=2e-5, rtol=0)
        for t_row, g_row, s_row in zip(trie.item_ids, gen.item_ids, trie.scores):
            for score in np.unique(s_row):  # the same items at each score level
                assert sorted(t_row[s_row == score]) == sorted(g_row[s_row == score])


class TestTreeSupport:
    def test_scores_are_the_tree_renormalised_policy(self, model, tiny_tokenizer, tree, prompts):
        T = 1.3
        recs = recommend(
            model,
            tiny_tokenizer,
            prompts[:3],
            tree,
            top_k=4,
            temperature=T,
            policy_support="tree",
            show_progress=False,
        )
        for u in range(3):
            ids = tiny_tokenizer(prompts[u])["input_ids"]
            for k in range(4):
                path, n = tree.item_paths(torch.tensor([int(recs.item_ids[u, k])]))
                path = path[0, : int(n[0])]
                with torch.no_grad():
                    logits = model(torch.tensor([ids + path.tolist()])).logits[0, len(ids) - 1 : -1].double()
                nodes = tree.walk(path.unsqueeze(0))[0, :-1]  # [n] node before each token
                total = 0.0
                for z, node, token in zip(logits, nodes, path):  # plain reference: softmax over the children
                    children = torch.tensor(tree.allowed_tokens(node.view(1))[0])
                    total += float(torch.log_softmax(z[children] / T, 0)[children == token][0])
                assert recs.scores[u, k] == pytest.approx(total / len(path), abs=1e-4)

    def test_control_tree_and_vocabulary_scores_differ(self, model, tiny_tokenizer, tree, prompts):
        kw = dict(top_k=9, show_progress=False)
        on_tree = recommend(model, tiny_tokenizer, prompts, tree, policy_support="tree", **kw)
        full = recommend(model, tiny_tokenizer, prompts, tree, **kw)
        assert (on_tree.scores > full.scores.max()).all()  # renormalised: every step's log-prob is larger


class TestNoVocabularySizedTensors:
    def test_lm_head_only_runs_on_one_row(self, model, tiny_tokenizer, tree, prompts):
        """The trie decoder never runs the full head on the beams (only the one-row check of the split); the
        generate path runs it on every beam (control)."""
        shapes: list[tuple[int, ...]] = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        recommend(model, tiny_tokenizer, prompts, tree, top_k=5, batch_size=16, show_progress=False)
        trie_shapes = list(shapes)
        shapes.clear()
        recommend(model, tiny_tokenizer, prompts, tree, top_k=5, batch_size=16, decoder="generate", show_progress=False)
        hook.remove()
        V = model.config.vocab_size
        assert trie_shapes == [(1, 1, V)]
        assert max(s[0] for s in shapes) == 16 * 5  # control: generate projects every beam

    def test_generate_prompt_pass_keeps_one_logit_row(self, model, tiny_tokenizer, tree, prompts):
        """The shared prompt cache of the generate path asks for the last position's logits only."""
        shapes: list[tuple[int, ...]] = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        recommend(
            model, tiny_tokenizer, prompts[:4], tree, top_k=5, batch_size=4, decoder="generate", show_progress=False
        )
        hook.remove()
        longest = max(len(tiny_tokenizer(p)["input_ids"]) for p in prompts[:4])
        assert longest > 3 and shapes[0] == (4, 1, model.config.vocab_size)  # not (4, longest - 1, V)

    def test_normaliser_chunks_stay_within_the_budget(self, monkeypatch):
        torch.manual_seed(0)
        V, H, R = 3000, 16, 12
        parts = ModelParts(decoder=None, weight=torch.randn(V, H), bias=torch.randn(V))
        hidden = torch.randn(R, H)
        rows, tokens = torch.tensor([0, 3, 3, 11, 11]), torch.tensor([0, 2999, 1, 700, 2048])
        blocks: list[int] = []
        linear = F.linear

        def spy(x, w, b=None):
            out = linear(x, w, b)
            blocks.append(out.numel())
            return out

        monkeypatch.setattr(output_head.F, "linear", spy)
        for T in (1.0, 0.7):
            norm, picked = log_normalizer(hidden, parts, rows, tokens, temperature=T, chunk_elements=4096)
            full = linear(hidden, parts.weight, parts.bias)  # [R, V] reference (spy not involved)
            torch.testing.assert_close(norm, torch.logsumexp(full / T, dim=1), atol=1e-5, rtol=0)
            torch.testing.assert_close(picked, full[rows, tokens] / T, atol=1e-6, rtol=0)
        assert max(blocks) <= R * chunk_columns(R, V, 4096) <= 4096  # never [R, V]
        assert len(blocks) == 2 * -(-V // chunk_columns(R, V, 4096))
        torch.testing.assert_close(
            edge_logits(hidden, parts, rows, tokens, chunk_elements=32),
            linear(hidden, parts.weight, parts.bias)[rows, tokens],
        )


class TestFallbackAndArguments:
    def test_head_that_is_not_a_plain_linear_falls_back_to_generate(
        self, tiny_model_dir, tiny_tokenizer, tree, prompts
    ):
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora).eval()
        assert split_model(peft_model) is None
        with pytest.warns(UserWarning, match="decoding with generate instead"):
            trie = recommend(peft_model, tiny_tokenizer, prompts[:4], tree, top_k=3, show_progress=False)
        gen = recommend(peft_model, tiny_tokenizer, prompts[:4], tree, top_k=3, decoder="generate", show_progress=False)
        np.testing.assert_array_equal(trie.item_ids, gen.item_ids)

    def test_scaled_logits_are_detected(self, model, tiny_tokenizer, tree, prompts, monkeypatch):
        """A forward that changes the logits after the head (soft-capping, scaling) is caught by the check."""
        original = type(model).forward

        def scaled(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out.logits = out.logits * 2.0
            return out

        monkeypatch.setattr(type(model), "forward", scaled)
        with pytest.warns(UserWarning, match="not lm_head"):
            recommend(model, tiny_tokenizer, prompts[:2], tree, top_k=3, show_progress=False)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(decoder="beam"), "decoder"),
            (dict(policy_support="items"), "policy_support"),
            (dict(policy_support="tree", decoder="generate"), "needs decoder='trie'"),
        ],
    )
    def test_invalid_arguments(self, model, tiny_tokenizer, tree, kwargs, match):
        with pytest.raises(ValueError, match=match):
            recommend(model, tiny_tokenizer, ["The user"], tree, top_k=2, show_progress=False, **kwargs)
