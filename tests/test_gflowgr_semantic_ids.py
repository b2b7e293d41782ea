"""Tests for the GFlowGR semantic-ID quantiser (no sentence encoder needed: user-supplied vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_flower.gflowgr.semantic_ids import SemanticIDs, collision_codes, fit_semantic_ids, kmeans
from trl_flower.tiny import build_model, build_tokenizer


def _embeddings(num_items=120, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(num_items, d))


def test_deterministic_with_seed_and_unique_codes():
    x = _embeddings()
    a = fit_semantic_ids(x, num_levels=3, codebook_size=6, seed=3)
    b = fit_semantic_ids(x, num_levels=3, codebook_size=6, seed=3)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.shape == (120, 4)
    assert a.codes[:, :3].max() < 6
    assert len(np.unique(a.codes, axis=0)) == 120  # the collision level leaves no collisions


def test_collision_codes_number_items_inside_each_group():
    sem = np.array([[0, 1], [0, 1], [2, 2], [0, 1], [2, 2]])
    np.testing.assert_array_equal(collision_codes(sem), [0, 1, 0, 2, 1])


def test_usage_report_on_duplicated_items():
    # 5 distinct vectors, each repeated 3 times: every item collides before the extra level and none after
    x = np.repeat(_embeddings(5, 4), 3, axis=0)
    ids = fit_semantic_ids(x, num_levels=2, codebook_size=4, seed=0)
    rep = ids.usage_report()
    assert rep["collision_rate_before"] == 1.0
    assert rep["collision_rate_after"] == 0.0
    assert rep["max_collision_group"] == 3
    assert rep["utilisation"][0] == 1.0  # 5 distinct points fill a 4-code first level
    assert len(rep["perplexity"]) == 2 and all(1.0 <= p <= 4.0 for p in rep["perplexity"])


def test_kmeans_uses_every_centroid_and_caps_k():
    x = torch.as_tensor(_embeddings(50, 3))
    c = kmeans(x, 8, generator=torch.Generator().manual_seed(0))
    assert c.shape == (8, 3)
    assert torch.cdist(x, c).argmin(1).unique().numel() == 8
    assert kmeans(x[:3], 8, generator=torch.Generator().manual_seed(0)).shape[0] == 3


def test_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="NaN"):
        fit_semantic_ids(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="num_items, d"):
        fit_semantic_ids(np.zeros(3))


def test_save_load_roundtrip(tmp_path):
    ids = fit_semantic_ids(_embeddings(40), num_levels=2, codebook_size=5, seed=1)
    ids.save(tmp_path)
    back = SemanticIDs.load(tmp_path)
    np.testing.assert_array_equal(back.codes, ids.codes)
    assert back.codebook_size == 5 and back.seed == 1 and len(back.codebooks) == 2
    np.testing.assert_allclose(back.codebooks[1], ids.codebooks[1])


def test_tokens_tree_and_model_resize(tmp_path):
    ids = fit_semantic_ids(_embeddings(30), num_levels=3, codebook_size=4, seed=0)
    tok = build_tokenizer(["some prompt text", "the user liked"], vocab_size=300)
    model = build_model(tok, hidden_size=16, num_layers=1)
    before = len(tok)
    table = ids.add_code_tokens(tok, model)
    assert len(tok) == before + sum(ids.level_sizes())
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.convert_ids_to_tokens(int(table[0, 2])) == "<a_2>"
    # a code string tokenises into exactly its L + 1 code tokens
    s = ids.item_strings([7])[0]
    np.testing.assert_array_equal(tok(s, add_special_tokens=False)["input_ids"], ids.item_token_ids([7])[0])
    assert ids.add_code_tokens(tok, model).tolist() == table.tolist()  # idempotent
    tree = ids.build_tree(tok.eos_token_id)
    assert tree.num_items == 30 and int(tree.is_terminal.sum()) == 30  # one terminal per item
    paths, lengths = tree.item_paths(torch.arange(30))
    assert (lengths == 5).all() and (paths[:, -1] == tok.eos_token_id).all()
    np.testing.assert_array_equal(paths[:, :4].numpy(), ids.item_token_ids())
    ids.save(tmp_path)
    np.testing.assert_array_equal(SemanticIDs.load(tmp_path).item_token_ids(), ids.item_token_ids())


def test_item_token_ids_needs_tokens():
    ids = fit_semantic_ids(_embeddings(10), num_levels=1, codebook_size=3)
    with pytest.raises(ValueError, match="add_code_tokens"):
        ids.item_token_ids()
