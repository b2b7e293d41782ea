"""Tests of the trie-constrained decoding processor (in the style of transformers' test_logits_process.py).

Hand-built trees over a 12-token vocabulary with uniform scores, so a mask is read off exactly with `isinf`; the
expected allowed sets come from a plain Python reference (`_reference_allowed`) that scans the item paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

import trl_flower.decoding as decoding
from trl_flower.decoding import LogProbTemperatureProcessor, TrieLogitsProcessor, generated_nodes
from trl_flower.tree import PrefixTree


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; with other jobs on the machine, 2 threads are up to 15x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


V = 12  # vocabulary size of the hand-built trees
PAD = 0  # pad token of the hand-built prompts
TERM = 1  # terminator of the hand-built trees
# Awkward cases: [4, 1] is a prefix of [4, 5, 1] (end AND continue), a shared 3-token prefix, fan-outs 1 to 3.
PATHS = [[4, 5, 1], [4, 6, 7, 1], [4, 1], [8, 1], [9, 5, 1], [4, 6, 10, 1]]


@pytest.fixture
def tree() -> PrefixTree:
    return PrefixTree.from_token_paths(PATHS, terminator_id=TERM)


def _reference_allowed(prefix: list[int], paths=PATHS, finished_token: int = TERM) -> set[int]:
    """Allowed next tokens after `prefix`, by scanning every path (no tree): the slow, obviously right reference."""
    for p in paths:  # a completed item absorbs whatever follows (HF pads finished rows)
        if prefix[: len(p)] == p:
            return {finished_token}
    return {p[len(prefix)] for p in paths if p[: len(prefix)] == prefix and len(p) > len(prefix)}


def _allowed_sets(scores: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(~torch.isinf(row)).flatten().tolist()) for row in scores]


def _uniform(rows: int) -> torch.Tensor:
    return torch.zeros(rows, V)


def _pick_allowed(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random allowed token per row (sampling from the masked uniform scores)."""
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen).squeeze(1)  # [R]


class TestMasks:
    def test_first_step_allows_first_tokens(self, tree):
        prompt = torch.tensor([[2, 3], [PAD, 3], [PAD, PAD]])  # left-padded prompts, P = 2
        out = TrieLogitsProcessor(tree)(prompt, _uniform(3))
        expected = torch.ones(3, V, dtype=torch.bool)
        expected[:, [4, 8, 9]] = False
        assert torch.equal(torch.isinf(out), expected)

    def test_exact_masks_along_paths(self, tree):
        # rows walk [4, 6, 7, 1], [4, 1, pad, pad], [9, 5, 1, pad] (pads as HF writes after EOS)
        gen = torch.tensor([[4, 6, 7, 1], [4, 1, PAD, PAD], [9, 5, 1, PAD]])
        prompt = torch.full((3, 3), 2)
        processor = TrieLogitsProcessor(tree)
        expected = [
            [{4, 8, 9}, {4, 8, 9}, {4, 8, 9}],
            [{1, 5, 6}, {1, 5, 6}, {5}],
            [{7, 10}, {TERM}, {TERM}],
            [{TERM}, {TERM}, {TERM}],
            [{TERM}, {TERM}, {TERM}],
        ]
        for t in range(gen.shape[1] + 1):
            out = processor(torch.cat([prompt, gen[:, :t]], dim=1), _uniform(3))
            assert _allowed_sets(out) == expected[t], f"step {t}"

    def test_allowed_scores_are_kept(self, tree):
        scores = torch.randn(2, V)
        out = TrieLogitsProcessor(tree)(torch.tensor([[2], [3]]), scores)
        keep = torch.tensor([4, 8, 9])
        assert torch.equal(out[:, keep], scores[:, keep])

    def test_does_not_modify_scores_in_place(self, tree):
        scores = torch.randn(3, V)
        before = scores.clone()
        out = TrieLogitsProcessor(tree)(torch.tensor([[2], [3], [2]]), scores)
        assert torch.equal(scores, before)
        assert out.data_ptr() != scores.data_ptr()
        assert torch.isinf(out).any()

    def test_finished_token_id_and_pad_after_finish(self, tree):
        # after [8, 1] the row is finished; pads (or anything) after it keep it finished
        processor = TrieLogitsProcessor(tree, prompt_length=1, finished_token_id=PAD)
        for gen in ([8, 1], [8, 1, PAD], [8, 1, PAD, PAD]):
            out = processor(torch.tensor([[2] + gen]), _uniform(1))
            assert _allowed_sets(out) == [{PAD}]

    def test_positive_flow_only_excludes_zero_reward_items(self, tree):
        rewards = [1, 1, 0, 0, 1, 1]  # items [4, 1] and [8, 1] have reward 0
        zero = tree.with_rewards(rewards)
        first = TrieLogitsProcessor(zero, positive_flow_only=True)(torch.tensor([[2]]), _uniform(1))
        assert _allowed_sets(first) == [{4, 9}]
        after4 = TrieLogitsProcessor(zero, prompt_length=1, positive_flow_only=True)(
            torch.tensor([[2, 4]]), _uniform(1)
        )
        assert _allowed_sets(after4) == [{5, 6}]  # termination after [4] has zero flow
        plain = TrieLogitsProcessor(zero, prompt_length=1)(torch.tensor([[2, 4]]), _uniform(1))
        assert _allowed_sets(plain) == [{1, 5, 6}]

    def test_left_padded_prompts_of_different_lengths(self, tree):
        # prompts of length 1, 3 and 5 left-padded to P = 5; prompt tokens (even tree tokens) are never walked
        prompts = torch.tensor([[PAD, PAD, PAD, PAD, 4], [PAD, PAD, 8, 9, 4], [4, 6, 7, 1, 8]])
        gen = torch.tensor([[4, 6], [9, 5], [4, 1]])
        out = TrieLogitsProcessor(tree, prompt_length=5)(torch.cat([prompts, gen], dim=1), _uniform(3))
        assert _allowed_sets(out) == [{7, 10}, {TERM}, {TERM}]


class TestBatchingAndBeams:
    @staticmethod
    def _rollout(tree, rows: int, steps: int, seed: int, reorder: bool):
        """Drive a processor like `generate` does; optionally permute/duplicate rows between steps (beam search)."""
        gen = torch.Generator().manual_seed(seed)
        prompt_len = torch.randint(1, 4, (rows,), generator=gen)  # [R] real prompt lengths
        P = int(prompt_len.max())
        ids = torch.full((rows, P), PAD)
        ids[torch.arange(P) >= P - prompt_len[:, None]] = 3  # left padding
        processor = TrieLogitsProcessor(tree)
        calls = []
        for _ in range(steps):
            out = processor(ids, _uniform(rows))
            calls.append((ids.clone(), out))
            nxt = _pick_allowed(out, gen)  # [R]
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if reorder:  # beams are re-gathered: rows permuted and duplicated
                ids = ids[torch.randint(0, rows, (rows,), generator=gen)]
        return P, calls

    @pytest.mark.parametrize("reorder", [False, True])
    def test_masks_match_reference_at_every_step(self, tree, reorder):
        P, calls = self._rollout(tree, rows=16, steps=6, seed=0, reorder=reorder)
        for ids, out in calls:
            expected = [_reference_allowed(row[P:].tolist()) for row in ids]
            assert _allowed_sets(out) == expected

    @pytest.mark.parametrize("reorder", [False, True])
    def test_batched_equals_row_by_row(self, tree, reorder):
        P, calls = self._rollout(tree, rows=8, steps=6, seed=1, reorder=reorder)
        for ids, out in calls:
            for r in range(ids.shape[0]):
                single = TrieLogitsProcessor(tree, prompt_length=P)(ids[r : r + 1], _uniform(1))
                assert torch.equal(single, out[r : r + 1])

    def test_beam_reorder_uses_row_matching_not_full_walks(self, tree, monkeypatch):
        processor = TrieLogitsProcessor(tree)
        gen = torch.Generator().manual_seed(2)
        ids = torch.full((6, 2), 3)
        processor(ids, _uniform(6))
        calls = 0

        def counting_walk(*args, **kwargs):
            nonlocal calls
            calls += 1
            return generated_nodes(*args, **kwargs)

        monkeypatch.setattr(decoding, "generated_nodes", counting_walk)
        for _ in range(4):
            out = processor(ids, _uniform(6))
            ids = torch.cat([ids, _pick_allowed(out, gen)[:, None]], dim=1)[torch.tensor([5, 5, 0, 2, 1, 3])]
        assert calls == 0

    def test_unmatched_rows_fall_back_to_a_full_walk(self, tree):
        processor = TrieLogitsProcessor(tree, prompt_length=1)
        processor(torch.tensor([[3, 4], [3, 9]]), _uniform(2))
        # next call: row 0 has a prefix ([8]) that no previous row had (not a generate pattern, still correct)
        out = processor(torch.tensor([[3, 8, 1], [3, 9, 5]]), _uniform(2))
        assert _allowed_sets(out) == [{TERM}, {TERM}]

    def test_new_generate_call_resets_inferred_prompt_length(self, tree):
        processor = TrieLogitsProcessor(tree)
        processor(torch.tensor([[3, 3, 3]]), _uniform(1))
        processor(torch.tensor([[3, 3, 3, 4]]), _uniform(1))
        out = processor(torch.tensor([[3, 3]]), _uniform(1))  # shorter: a new call with a new prompt
        assert processor.prompt_length == 2
        assert _allowed_sets(out) == [{4, 8, 9}]
        processor.reset()
        assert processor.prompt_length is None


class TestErrors:
    def test_rejects_out_of_tree_token(self, tree):
        processor = TrieLogitsProcessor(tree, prompt_length=1)
        with pytest.raises(ValueError, match=r"row 1 left the item tree: generated token 7 at position 1"):
            processor(torch.tensor([[3, 4, 5], [3, 4, 7]]), _uniform(2))

    def test_rejects_zero_flow_node_with_positive_flow_only(self, tree):
        zero = tree.with_rewards([1, 1, 1, 0, 1, 1])  # item [8, 1] has reward 0
        processor = TrieLogitsProcessor(zero, prompt_length=1, positive_flow_only=True)
        message = r"row 1 .* token 8 at position 0 after the prompt leads to a node with zero flow"
        with pytest.raises(ValueError, match=message):
            processor(torch.tensor([[3, 4, 5], [3, 8, 1]]), _uniform(2))

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(prompt_length=-1), "prompt_length"),
            (dict(prompt_length=2.0), "prompt_length"),
            (dict(finished_token_id=-3), "finished_token_id"),
        ],
    )
    def test_invalid_arguments(self, tree, kwargs, match):
        with pytest.raises(ValueError, match=match):
            TrieLogitsProcessor(tree, **kwargs)

    def test_invalid_tree_and_all_zero_rewards(self, tree):
        with pytest.raises(ValueError, match="PrefixTree"):
            TrieLogitsProcessor({"4": [5]})
        with pytest.raises(ValueError, match="every item reward is 0"):
            TrieLogitsProcessor(tree.with_rewards([0] * len(PATHS)), positive_flow_only=True)

    def test_rejects_nan_scores_on_allowed_tokens(self, tree):
        scores = _uniform(3)
        scores[0, 11] = float("nan")  # on a masked token: harmless, it becomes −inf
        assert torch.isinf(TrieLogitsProcessor(tree)(torch.tensor([[3], [3], [3]]), scores)[0, 11])
        scores[2, 8] = float("nan")  # on an allowed token: it would win every beam comparison
        with pytest.raises(ValueError, match=r"scores of row 2 are NaN on allowed tokens"):
            TrieLogitsProcessor(tree)(torch.tensor([[3], [3], [3]]), scores)

    def test_call_errors(self, tree):
        with pytest.raises(ValueError, match="scores have 8 columns"):
            TrieLogitsProcessor(tree)(torch.tensor([[3]]), torch.zeros(1, 8))
        with pytest.raises(ValueError, match="fewer than prompt_length=4"):
            TrieLogitsProcessor(tree, prompt_length=4)(torch.tensor([[3, 3]]), _uniform(1))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            TrieLogitsProcessor(tree, finished_token_id=50)(torch.tensor([[3]]), _uniform(1))


def test_generated_nodes_absorbs_after_terminal_and_reports_off_tree(tree):
    # complete + pad, cut off by a length limit, off-tree at 7, complete + junk, pad where a title token is due
    gen = torch.tensor([[4, 5, 1], [4, 6, 7], [9, 7, 1], [8, 1, 8], [4, 6, PAD]])
    nodes, off_at = generated_nodes(tree, gen)
    assert tree.terminal_item(nodes).tolist() == [0, -1, -1, 3, -1]
    assert off_at.tolist() == [-1, -1, 1, -1, 2]
    assert nodes[4] == -1 and tree.allowed_tokens(nodes[1:2]) == [[TERM]]


class TestLogProbTemperature:
    def test_temperature_one_is_log_softmax(self):
        logp = torch.log_softmax(torch.randn(3, V), dim=-1)
        out = LogProbTemperatureProcessor(1.0)(torch.zeros(3, 1, dtype=torch.long), logp)
        torch.testing.assert_close(out, logp)

    def test_tempered_distribution(self):
        logp = torch.log_softmax(torch.randn(2, V, dtype=torch.float64), dim=-1)
        T = 1.7
        out = LogProbTemperatureProcessor(T)(torch.zeros(2, 1, dtype=torch.long), logp)
        expected = logp.exp() ** (1 / T) / (logp.exp() ** (1 / T)).sum(-1, keepdim=True)  # p^(1/T) / Σ p^(1/T)
        torch.testing.assert_close(out.exp(), expected)

    @pytest.mark.parametrize("T", [0, -1.0, float("nan")])
    def test_invalid_temperature(self, T):
        with pytest.raises(ValueError, match="temperature"):
            LogProbTemperatureProcessor(T)


def test_sampling_follows_process_rewards():
    """A tabular 'model' whose logits are the tree's log process rewards samples items ∝ R(i) under the mask."""
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    tree = PrefixTree.from_token_paths(PATHS, terminator_id=TERM, item_rewards=rewards)
    N = 40_000  # rows sampled in parallel
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((N, 1), 3)
    processor = TrieLogitsProcessor(tree)
    nodes = torch.zeros(N, dtype=torch.long)  # the 'model's own state, tracked with tree.advance
    for _ in range(max(map(len, PATHS))):
        vocab = torch.arange(V).expand(N, V)  # [N, V]
        logits = tree.log_process_reward(nodes[:, None].expand(N, V), vocab).float()  # [N, V], −inf off-tree
        logits = torch.where(torch.isinf(logits), torch.randn(N, V, generator=gen) + 5.0, logits)  # junk to mask
        logits = torch.where(tree.terminal_item(nodes)[:, None] >= 0, torch.zeros_like(logits), logits)  # finished
        scores = processor(ids, logits)
        nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen).squeeze(1)  # [N]
        nodes = torch.where(tree.terminal_item(nodes) >= 0, nodes, tree.advance(nodes, nxt))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    items = tree.terminal_item(nodes)
    assert bool((items >= 0).all())
    observed = np.bincount(items.numpy(), minlength=len(PATHS))
    expected = N * rewards / rewards.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom: P(χ² > 20.5) ≈ 0.001


class TestWithTinyCausalLM:
    """The processor inside real `generate` calls with the tiny random Qwen2 (its own choices are arbitrary)."""

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, tiny_model_dir, tiny_tokenizer, tiny_titles):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
        prompts = ["The user has enjoyed", "Recommend the next item. The user has enjoyed the following items before:"]
        enc = tiny_tokenizer(prompts, return_tensors="pt", padding=True)  # left padding
        return model, tree, enc

    @staticmethod
    def _config(tok, **kwargs) -> GenerationConfig:
        return GenerationConfig(
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=12, **kwargs
        )

    def _assert_complete_items(self, tree, seqs: torch.Tensor, P: int) -> torch.Tensor:
        nodes, off_at = generated_nodes(tree, seqs[:, P:])
        items = tree.terminal_item(nodes)
        assert bool((off_at < 0).all()) and bool((items >= 0).all())
        paths, lengths = tree.item_paths(items)
        for row, path, n in zip(seqs[:, P:], paths, lengths):  # the exact catalogue path, then only padding
            assert row[:n].tolist() == path[:n].tolist()
        return items

    def test_sampling_generates_only_catalogue_items(self, setup, tiny_tokenizer):
        model, tree, enc = setup
        torch.manual_seed(0)
        cfg = self._config(tiny_tokenizer, do_sample=True, temperature=1.5, top_k=0, num_return_sequences=200)
        processors = LogitsProcessorList([TrieLogitsProcessor(tree)])
        out = model.generate(**enc, generation_config=cfg, logits_processor=processors)
        items = self._assert_complete_items(tree, out, enc.input_ids.shape[1])
        assert len(set(items.tolist())) == int(tree.is_terminal.sum())  # 400 samples at T=1.5 visit every title

    def test_beam_search_returns_all_distinct_items(self, setup, tiny_tokenizer):
        model, tree, enc = setup
        K = int(tree.is_terminal.sum())  # 9 distinct title paths (one duplicate title)
        cfg = self._config(tiny_tokenizer, do_sample=False, num_beams=K, num_return_sequences=K)
        processors = LogitsProcessorList([TrieLogitsProcessor(tree)])
        out = model.generate(**enc, generation_config=cfg, logits_processor=processors)
        items = self._assert_complete_items(tree, out, enc.input_ids.shape[1]).view(2, K)
        for row in items.tolist():
            assert sorted(row) == sorted(set(tree.terminal_item(torch.as_tensor(tree.item_node)).tolist()))

    def test_unconstrained_model_leaves_the_catalogue(self, setup, tiny_tokenizer):
        """Control: without the processor, the random model does not produce catalogue paths."""
        model, tree, enc = setup
        torch.manual_seed(0)
        cfg = self._config(tiny_tokenizer, do_sample=True, num_return_sequences=20)
        out = model.generate(**enc, generation_config=cfg)
        nodes, _ = generated_nodes(tree, out[:, enc.input_ids.shape[1] :])
        assert math.isclose(float((tree.terminal_item(nodes) >= 0).float().mean()), 0.0, abs_tol=0.1)


def test_docs_page_examples_print_what_they_say():
    """Run docs/decoding.md's ```python blocks (```py blocks are illustrations that need a model); each
    `print(...)` line followed by `# ` comment lines must print exactly those lines."""
    import contextlib
    import io
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "decoding.md"
    namespace: dict = {}
    checked = 0
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        expected = [c.replace("# ", "", 1) for c in re.findall(r"^print\(.*\n(# .*)$", block, re.M)]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block, str(page), "exec"), namespace)
        assert buffer.getvalue().splitlines() == expected
        checked += len(expected)
    assert checked == 2


def test_module_docstring_examples_run():
    import doctest

    import trl_flower.evaluation.recommend as recommend_module

    for module in (decoding, recommend_module):
        result = doctest.testmod(module)
        assert result.failed == 0
    assert doctest.testmod(decoding).attempted >= 8
