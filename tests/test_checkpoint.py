"""`trl_flower.checkpoint` (the on-disk format of a saved run) and `trl_flower.model_card` (its card).

Round trips of every file a run holds beside its weights, the catalogue check, the tree resolution order, and the
guard behind "one place writes and reads each file name": no other module of the package, the examples or the
benchmarks spells them. Everything here is file I/O on tiny objects; no model is trained.
"""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_flower import checkpoint, model_card
from trl_flower.tree import PrefixTree

REPO = Path(__file__).resolve().parents[1]
FILE_NAMES = (
    checkpoint.TREE_FILE,
    checkpoint.RECORD_FILE,
    checkpoint.ITEM_GROUPS_FILE,
    checkpoint.OFFLINE_RNG_FILE,
    *checkpoint.LEGACY_TREE_FILES,
)


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=np.arange(1.0, 11.0))


def test_run_files_round_trip(tree, tmp_path):
    record = {"format": checkpoint.RECORD_FORMAT, "flow_lambda": 0.005, "tree_file": checkpoint.TREE_FILE}
    groups = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7, 7])
    out = checkpoint.save_run_files(tmp_path / "run", tree=tree, record=record, item_groups=torch.as_tensor(groups))
    assert sorted(p.name for p in out.iterdir()) == sorted(FILE_NAMES[:3])
    loaded = checkpoint.load_tree(out)
    np.testing.assert_array_equal(loaded.token, tree.token)
    np.testing.assert_array_equal(loaded.item_rewards, tree.item_rewards)
    assert checkpoint.read_record(out) == record
    np.testing.assert_array_equal(checkpoint.load_item_groups(out), groups)


def test_a_baseline_run_has_only_the_tree(tree, tmp_path):
    out = checkpoint.save_run_files(tmp_path, tree=tree)
    assert [p.name for p in out.iterdir()] == [checkpoint.TREE_FILE]
    assert checkpoint.read_record(out) == {} and checkpoint.load_item_groups(out) is None
    assert not checkpoint.has_tree(out)  # no weights: not a model directory
    (out / "config.json").write_text("{}")
    assert checkpoint.has_tree(out) and checkpoint.is_model_dir(out)


def test_is_model_dir_accepts_a_peft_adapter(tmp_path):
    assert not checkpoint.is_model_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert checkpoint.is_model_dir(tmp_path)


def test_find_tree_order(tree, tmp_path):
    assert checkpoint.find_tree(tmp_path) is None
    tree.save(tmp_path / checkpoint.LEGACY_TREE_FILES[0])
    assert checkpoint.find_tree(tmp_path).name == checkpoint.LEGACY_TREE_FILES[0]  # older runs still load
    tree.save(tmp_path / checkpoint.TREE_FILE)
    assert checkpoint.find_tree(tmp_path).name == checkpoint.TREE_FILE
    tree.save(tmp_path / "mine.npz")
    assert checkpoint.find_tree(tmp_path, {"tree_file": "mine.npz"}).name == "mine.npz"  # the record names it


def test_a_broken_record_names_the_file_and_the_fix(tmp_path):
    (tmp_path / checkpoint.RECORD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{checkpoint.RECORD_FILE} is not valid JSON .*Delete it"):
        checkpoint.read_record(tmp_path)
    (tmp_path / checkpoint.RECORD_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        checkpoint.read_record(tmp_path)


def test_offline_generator_round_trip(tmp_path):
    assert checkpoint.load_offline_rng(tmp_path) is None
    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)
    checkpoint.save_offline_rng(tmp_path, generator)
    restored = checkpoint.load_offline_rng(tmp_path)
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))


def test_catalogue_tree_uses_a_matching_saved_tree_and_refuses_another(tree, tiny_titles, tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prefix_tree.npz not found: .* ask for it: .*--rebuild-tree"):
        checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer)  # no silent rebuild
    built, source = checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer, rebuild=True)
    assert source == "built from the catalogue titles" and built.num_items == len(tiny_titles)
    tree.save(tmp_path / checkpoint.TREE_FILE)
    saved, source = checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer)
    assert source == str(tmp_path / checkpoint.TREE_FILE)
    np.testing.assert_array_equal(saved.item_rewards, tree.item_rewards)  # the saved tree, not a rebuilt one
    _, source = checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer, rebuild=True)
    assert source.startswith("built")

    PrefixTree.from_titles(list(reversed(tiny_titles)), tiny_tokenizer).save(tmp_path / checkpoint.TREE_FILE)
    with pytest.raises(ValueError, match="does not match the catalogue for .* --rebuild-tree"):
        checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer)
    with pytest.raises(ValueError, match="has 10 items but the catalogue has 9"):
        checkpoint.catalogue_tree(tmp_path, tiny_titles[:9], tiny_tokenizer)
    with pytest.raises(ValueError, match="contradict"):
        checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer, tree_path=tmp_path / "x", rebuild=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        checkpoint.catalogue_tree(tmp_path, tiny_titles, tiny_tokenizer, tree_path=tmp_path / "missing.npz")


def test_resolve_tree_order(tree, tiny_titles, tiny_tokenizer, tmp_path):
    assert checkpoint.resolve_tree(tree) is tree
    tree.save(tmp_path / "t.npz")
    assert checkpoint.resolve_tree(tmp_path / "t.npz").num_nodes == tree.num_nodes
    built = checkpoint.resolve_tree(titles=tiny_titles[:5], tokenizer=tiny_tokenizer)
    assert built.num_items == 5
    checkpoint.save_run_files(tmp_path / "run", tree=tree)
    found = checkpoint.resolve_tree(model_dirs=(None, tmp_path / "empty", tmp_path / "run"))
    np.testing.assert_array_equal(found.item_rewards, tree.item_rewards)
    with pytest.raises(ValueError, match="no prefix tree"):
        checkpoint.resolve_tree(model_dirs=(tmp_path / "empty",))


def test_flower_record_holds_every_flower_field_and_the_reward_models_settings(tree):
    from dataclasses import fields

    from trl import GRPOConfig

    from trl_flower.config import FlowerConfig
    from trl_flower.rewards import PrefixTreeRewardModel

    args = FlowerConfig(output_dir="unused", flow_lambda=0.25, offline_trajectory_prob=0.5)
    reward = PrefixTreeRewardModel(tree, title_log_term="official")
    record = checkpoint.flower_record(args, tree, reward, finished_token_id=None, has_item_groups=False)
    flower_only = {f.name for f in fields(FlowerConfig)} - {f.name for f in fields(GRPOConfig)}
    assert flower_only <= set(record)  # a field added to FlowerConfig is recorded automatically
    assert (record["flow_lambda"], record["offline_trajectory_prob"]) == (0.25, 0.5)
    assert record["format"] == checkpoint.RECORD_FORMAT and record["item_groups_file"] is None
    assert (record["terminator_id"], record["num_items"]) == (tree.terminator_id, tree.num_items)
    assert json.loads(json.dumps(record)) == record  # JSON as is


def test_no_other_module_spells_a_checkpoint_file_name():
    """The done-when check of issue 21: `trl_flower/checkpoint.py` is the one place that names these files, for the
    package, the examples and the benchmarks alike (docs and tests may name them)."""
    pattern = re.compile("|".join(re.escape(name) for name in FILE_NAMES))
    offenders = []
    scripts = [*(REPO / "trl_flower").rglob("*.py"), *(REPO / "examples").rglob("*.py"), *(REPO / "bench").glob("*.py")]
    assert len(scripts) > 60  # the three trees were found
    for path in scripts:
        if path.name != "checkpoint.py" and pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


# ------------------------------------------------------------------------------------------------ model cards


def test_card_sections():
    flower = model_card.flower_section({"format": "x", "tree_file": "t", "flow_loss": "tb", "flow_lambda": 0.005})
    lines = flower.splitlines()
    assert lines[0] == "## Flower settings"
    assert (
        lines.index("| `flow_lambda` | 0.005 |")
        < lines.index("| `flow_loss` | tb |")
        < lines.index("| `tree_file` | t |")
    )
    assert "`format`" not in flower  # the format tag is bookkeeping, not a setting
    data = model_card.data_section({"dataset": "CDs_and_Vinyl", "items": 5841})
    assert data.splitlines()[0] == "## Training data" and "| `items` | 5841 |" in data
    metrics = model_card.evaluation_section({"NDCG@5": 0.07, "num_users": 10, "group_shares": [0.5, 0.5]})
    assert "| `NDCG@5` | 0.07 |" in metrics and "| `num_users` | 10 |" in metrics
    assert "group_shares" not in metrics  # only scalars are tabulated


def test_append_flower_section_once(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# TRL card\n")
    model_card.append_flower_section(card, {"flow_lambda": 0.1})
    model_card.append_flower_section(card, {"flow_lambda": 0.1})
    text = card.read_text()
    assert text.startswith("# TRL card\n\n## Flower settings") and text.count("## Flower settings") == 1


class _CardTrainer:
    """The part of a TRL trainer `write_model_card` uses: a card written to ``args.output_dir``."""

    def __init__(self, output_dir: Path, main: bool = True) -> None:
        self.args = type("Args", (), {"output_dir": str(output_dir)})()
        self.main, self.calls = main, []

    def is_world_process_zero(self) -> bool:
        return self.main

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        self.calls.append((model_name, dataset_name, tags))
        Path(self.args.output_dir, "README.md").write_text(f"# {model_name}\n")


def test_write_model_card_moves_the_card_and_adds_data_and_metrics(tmp_path):
    trainer = _CardTrainer(tmp_path / "train")
    (tmp_path / "train").mkdir()
    card = model_card.write_model_card(
        trainer, tmp_path / "final", dataset_name="Movies", data={"items": 3}, metrics={"HR@5": 0.5}
    )
    assert card == tmp_path / "final" / "README.md" and not (tmp_path / "train" / "README.md").exists()
    assert trainer.calls == [("final", "Movies", ["trl-flower"])]
    text = card.read_text()
    assert text.startswith("# final") and "| `items` | 3 |" in text and "| `HR@5` | 0.5 |" in text
    assert model_card.write_model_card(_CardTrainer(tmp_path, main=False), tmp_path) is None  # other ranks: nothing


def test_model_card_doctests():
    result = doctest.testmod(model_card)
    assert result.attempted >= 1 and result.failed == 0
