"""The exact title distribution of an LM (`trl_flower.evaluation.item_distribution`) against a plain reference.

Tiny random Qwen2 and catalogue of `conftest.py` ("Blue Train" is items 3 and 4: one title, one path).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_flower.evaluation.item_distribution import (
    agreement,
    item_to_title_mass,
    title_items,
    title_log_probs,
    title_nodes,
)
from trl_flower.tree import PrefixTree


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer) -> PrefixTree:
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer)


def reference_log_probs(model, prompt_ids, tree):
    """One full forward of prompt + path per title, no cache: the sum of the path's token log-probs."""
    nodes, title_of_item = title_nodes(tree)
    out = []
    for t in range(len(nodes)):
        item = int(np.flatnonzero(title_of_item == t)[0])
        path, length = tree.item_paths(torch.tensor([item]))
        path = path[0, : int(length[0])]
        ids = torch.tensor([prompt_ids + path.tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # [P+L, V]
        P = len(prompt_ids)
        out.append(sum(float(logp[P - 1 + j, path[j]]) for j in range(len(path))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_title_log_probs_equal_a_plain_forward_per_title(model, tree, tiny_tokenizer, chunk_size):
    prompt_ids = tiny_tokenizer("Blue Train and Kind of Blue, next:")["input_ids"]
    got = title_log_probs(model, prompt_ids, tree, chunk_size=chunk_size)
    want = reference_log_probs(model, prompt_ids, tree)
    assert got.shape == (len(title_nodes(tree)[0]),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float(torch.logsumexp(got, 0)) <= 1e-9  # titles are disjoint events: at most probability 1 in all


def test_title_log_probs_depend_on_the_prompt(model, tree, tiny_tokenizer):
    """Control: another prompt gives other values, so the equality above is not one of constants."""
    a = title_log_probs(model, tiny_tokenizer("Rumours")["input_ids"], tree)
    b = title_log_probs(model, tiny_tokenizer("Back to Life, Blue Train, Kind of Blue")["input_ids"], tree)
    assert not torch.allclose(a, b)


def test_duplicate_titles_pool_their_mass(tree, tiny_titles):
    nodes, title_of_item = title_nodes(tree)
    assert len(nodes) == len(set(tiny_titles)) < len(tiny_titles)
    p_items = np.arange(1, len(tiny_titles) + 1, dtype=float)
    p_items /= p_items.sum()
    p_titles = item_to_title_mass(p_items, title_of_item, len(nodes))
    dup = [i for i, t in enumerate(tiny_titles) if tiny_titles.count(t) > 1]
    first = title_items(title_of_item)
    assert first.tolist() == [int(np.flatnonzero(title_of_item == t).min()) for t in range(len(nodes))]
    assert first[title_of_item[dup[1]]] == dup[0]  # the duplicate title is reported by its smaller id
    assert p_titles.sum() == pytest.approx(1.0)
    assert p_titles[title_of_item[dup[0]]] == pytest.approx(p_items[dup].sum())
    batch = item_to_title_mass(np.stack([p_items, p_items[::-1]]), title_of_item, len(nodes))
    np.testing.assert_allclose(batch[0], p_titles)


def test_agreement_of_a_distribution_with_itself_and_with_another():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    same = agreement(np.log(p * 0.5), p, k=2)  # half the LM's mass off the catalogue: renormalised away
    assert same["kl_p_q"] == pytest.approx(0.0, abs=1e-12)
    assert same["catalogue_mass"] == pytest.approx(0.5)
    assert same["top_overlap"] == 1.0 and same["q_top_mass_of_p"] == pytest.approx(0.8)
    reversed_q = agreement(np.log(p[::-1].copy()), p, k=2)
    assert reversed_q["top_overlap"] == 0.0
    assert reversed_q["q_top_mass_of_p"] == pytest.approx(0.2)
    want = float(np.sum(p * np.log(p / p[::-1])))
    assert reversed_q["kl_p_q"] == pytest.approx(want)
    with pytest.raises(ValueError, match="one length"):
        agreement(np.zeros(3), p)
