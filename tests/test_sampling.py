"""The trainer's building blocks outside the trainer: sampling on a prompt cache and prompt-sharing forwards."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.prompt_sharing import (
    continue_on_cache,
    prompt_forward,
    repeated_prompt_forward,
    stacked_continuation_logits,
)
from trl_flower.sampling import detached_cache, sample_on_cache, sampling_warpers
from trl_flower.tree import PrefixTree

PROMPTS = [
    "The user has enjoyed the following items before:",
    "Recommend the next item.",
    "The user has enjoyed",
    "Recommend",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer)


def _prompts(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding (the tiny tokenizer's side)
    return enc["input_ids"], enc["attention_mask"]


def _sample(model, tree, tokenizer, uniforms):
    ids, mask = _prompts(tokenizer)
    with torch.no_grad():
        first, cache = prompt_forward(model, ids, mask)
    trie = TrieLogitsProcessor(tree, prompt_length=0)
    return sample_on_cache(
        model, first, detached_cache(cache), mask, uniforms, trie, [tree.terminator_id], tokenizer.pad_token_id
    )


def test_samples_are_catalogue_items_and_follow_the_uniforms(model, tree, tiny_tokenizer):
    T = int(tree.item_length.max())
    uniforms = torch.rand(len(PROMPTS), T, generator=torch.Generator().manual_seed(1))
    a = _sample(model, tree, tiny_tokenizer, uniforms)
    b = _sample(model, tree, tiny_tokenizer, uniforms)
    assert torch.equal(a, b)  # the randomness is all in `uniforms`
    tokens, lengths = tree.item_paths(torch.arange(tree.num_items))
    paths = {tuple(row[:n]) for row, n in zip(tokens.tolist(), lengths.tolist())}
    for row in a.tolist():
        end = row.index(tree.terminator_id) + 1  # every row terminates within the longest path
        assert tuple(row[:end]) in paths
        assert all(t == tiny_tokenizer.pad_token_id for t in row[end:])


def test_zero_uniform_takes_the_smallest_allowed_token(model, tree, tiny_tokenizer):
    uniforms = torch.zeros(len(PROMPTS), int(tree.item_length.max()))
    out = _sample(model, tree, tiny_tokenizer, uniforms)
    root = torch.zeros(1, dtype=torch.long)
    assert (out[:, 0] == min(tree.allowed_tokens(root)[0])).all()  # inverse CDF at u = 0: the first allowed id


def test_sampling_warpers_only_for_settings_that_do_something():
    assert sampling_warpers() == []
    assert sampling_warpers(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) == []
    assert len(sampling_warpers(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)) == 4


def test_continuing_on_the_cache_equals_running_rows_in_full(model, tiny_tokenizer):
    ids, mask = _prompts(tiny_tokenizer)
    g = torch.Generator().manual_seed(2)
    conts = []
    for n in (3, 5):
        c_ids = torch.randint(5, model.config.vocab_size, (len(PROMPTS), n), generator=g)
        c_mask = torch.ones_like(c_ids, dtype=torch.bool)
        c_mask[0, n - 1 :] = False  # a shorter continuation in row 0 (right padding)
        conts.append((c_ids, c_mask))
    with torch.no_grad():
        first, cache = prompt_forward(model, ids, mask)
        shared = continue_on_cache(model, first, cache, mask, conts, tiny_tokenizer.pad_token_id)
        stacked = stacked_continuation_logits(model, ids, mask, conts, tiny_tokenizer.pad_token_id)
    for (c_ids, c_mask), a, b in zip(conts, shared, stacked):
        assert a.shape == b.shape == (len(PROMPTS), c_ids.shape[1] + 1, model.config.vocab_size)
        keep = torch.cat([torch.ones(len(PROMPTS), 1, dtype=torch.bool), c_mask], dim=1)  # states with real input
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-4, atol=1e-4)


def test_repeated_prompt_forward_gives_each_row_its_prompts_state(model, tree, tiny_tokenizer):
    """One prompt pass repeated for r rows per prompt = the pass over the prompts repeated r times: the same first
    logits, mask and samples (row b·r + i continues prompt b)."""
    ids, mask = _prompts(tiny_tokenizer)
    r = 3
    with torch.no_grad():
        first, cache, rows_mask = repeated_prompt_forward(model, ids, mask, r)
        each_first, each_cache = prompt_forward(model, ids.repeat_interleave(r, 0), mask.repeat_interleave(r, 0))
    assert first.shape == (len(PROMPTS) * r, 1, model.config.vocab_size) and cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(first, each_first, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows_mask, mask.repeat_interleave(r, 0))
    uniforms = torch.rand(len(PROMPTS) * r, int(tree.item_length.max()), generator=torch.Generator().manual_seed(2))
    trie = TrieLogitsProcessor(tree, prompt_length=0)
    eos, pad = [tree.terminator_id], tiny_tokenizer.pad_token_id
    shared = sample_on_cache(model, first, cache, rows_mask, uniforms, trie, eos, pad)
    trie = TrieLogitsProcessor(tree, prompt_length=0)
    each = sample_on_cache(model, each_first, each_cache, rows_mask, uniforms, trie, eos, pad)
    assert torch.equal(shared, each)


def test_prompt_forward_passes_position_ids_and_refuses_a_model_without_cache(model, tiny_tokenizer):
    ids, mask = _prompts(tiny_tokenizer)  # left-padded rows of unequal length
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate numbers left-padded prompts
    with torch.no_grad():
        numbered, cache = prompt_forward(model, ids, mask, position_ids=positions)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1:]
    torch.testing.assert_close(numbered, expected, rtol=1e-5, atol=1e-5)
    assert numbered.shape == (len(PROMPTS), 1, model.config.vocab_size) and cache.get_seq_length() == ids.shape[1]
    no_cache = lambda **kwargs: type("Output", (), {"past_key_values": None, "logits": None})()  # noqa: E731
    assert prompt_forward(no_cache, ids, mask) == (None, None)
