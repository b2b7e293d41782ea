"""The trainer's building blocks outside the trainer: sampling on a prompt cache and prompt-sharing forwards."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.prompt_sharing import continue_on_cache, prompt_forward, stacked_continuation_logits
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
