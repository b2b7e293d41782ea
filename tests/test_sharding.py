"""Evaluation across processes, the parts that run in one process: which batches a process decodes, and that the
single-process path is a plain call. The 2-process run itself is in tests/test_distributed_evaluate.py."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_flower.evaluation import recommend as recommend_module
from trl_flower.evaluation import sharding
from trl_flower.evaluation.recommend import recommend
from trl_flower.evaluation.sharding import decode_across_processes, process_device, shard_batches, world
from trl_flower.tree import PrefixTree


def test_doctests():
    assert doctest.testmod(sharding).failed == 0


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_prompt_once_in_single_process_batches(world_size):
    lengths = np.random.default_rng(0).integers(1, 9, size=23).tolist()  # many equal lengths: the sort must be stable
    single = shard_batches(lengths, 4, 0, 1)
    shards = [shard_batches(lengths, 4, r, world_size) for r in range(world_size)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(23))
    batches = [single[s : s + 4].tolist() for s in range(0, 23, 4)]
    for r, shard in enumerate(shards):  # process r gets exactly batches r, r + N, ... of the single process
        assert [shard[s : s + 4].tolist() for s in range(0, shard.size, 4)] == batches[r::world_size]


def test_world_from_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1) and process_device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == (2, 4) and process_device("cuda") == "cuda:1" and process_device("cpu") == "cpu"


def test_recommend_on_a_shard_forms_the_single_process_batches(
    tiny_model_dir, tiny_tokenizer, tiny_titles, monkeypatch
):
    """recommend re-sorts the prompts it is given: on a shard it must cut the same batches as on all prompts."""
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer)
    words = "The user has enjoyed Back to Life, Blue Train and Rumours before. Recommend the next item.".split()
    prompts = [" ".join(words[: 2 + (5 * i) % 13]) for i in range(11)]
    lengths = [len(ids) for ids in tiny_tokenizer(prompts)["input_ids"]]
    seen: list[list[int]] = []
    inner = recommend_module._trie_batch

    def spy(input_ids, attention_mask, *args, **kwargs):
        seen.append(sorted(tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)))
        return inner(input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(recommend_module, "_trie_batch", spy)
    kwargs = dict(top_k=3, batch_size=3, show_progress=False)
    full = recommend(model, tiny_tokenizer, prompts, tree, **kwargs)
    single_batches = list(seen)
    seen.clear()
    parts = []
    for rank in range(2):
        idx = shard_batches(lengths, 3, rank, 2)
        parts.append((idx, recommend(model, tiny_tokenizer, [prompts[i] for i in idx], tree, **kwargs)))
    assert sorted(seen) == sorted(single_batches)  # the same batches, with the same padding
    for idx, recs in parts:
        np.testing.assert_array_equal(recs.item_ids, full.item_ids[idx])
        np.testing.assert_array_equal(recs.scores, full.scores[idx])  # bit for bit
    one = decode_across_processes(
        lambda i: recommend(model, tiny_tokenizer, [prompts[j] for j in i], tree, **kwargs), lengths, 3, tree
    )
    np.testing.assert_array_equal(one.scores, full.scores)


def test_a_job_with_a_process_group_decodes_everything_in_the_calling_process(monkeypatch):
    """A training job evaluating on its main process only (examples/flower_cds.py) must not wait for the others."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the job's own group; no collective may run
    monkeypatch.setattr(dist, "all_gather_object", lambda *a, **k: pytest.fail("a collective was started"))
    called = []
    out = decode_across_processes(lambda idx: called.append(idx.tolist()) or "all", [3, 1, 2], 2, tree=None)
    assert out == "all" and called == [[0, 1, 2]]
