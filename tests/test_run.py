"""`trl_flower.run`: the one library entry point (data, model, tree/rewards, config) -> a trained, saved run.

The command line, the demo and the examples are tested end to end in their own files; here: the data it takes, the
config each method needs, the errors before anything loads, and one Flower run through the Python API.
"""

from __future__ import annotations

import numpy as np
import pytest

from trl_flower import checkpoint
from trl_flower.data.synthetic import make_synthetic
from trl_flower.run import METHODS, RunData, config_class, method_defaults, recommendation_data, train


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(num_items=40, num_users=40, seed=0)


class _Prompts:
    """A stand-in PromptBuilder: the history joined, in reference mode."""

    mode = "reference"

    def add_prompts(self, dataset):
        return dataset.map(lambda row: {"prompt": ", ".join(row["history_item_title"]) + "\n"})


def test_recommendation_data_counts_the_full_training_split(synthetic):
    full = recommendation_data(synthetic, _Prompts())
    sliced = recommendation_data(synthetic, _Prompts(), max_train_rows=10, eval_split="valid", max_eval_rows=3)
    assert sliced.train_dataset.num_rows == 10 and sliced.eval_dataset.num_rows == 3
    np.testing.assert_array_equal(sliced.item_counts, full.item_counts)  # the catalogue's statistics, not the slice's
    np.testing.assert_array_equal(sliced.item_groups, full.item_groups)
    np.testing.assert_array_equal(full.counts(), full.item_counts)
    # without given counts, RunData counts its own rows' histories
    own = RunData(items=full.items, train_dataset=sliced.train_dataset).counts()
    assert own.sum() == sum(len(h) for h in sliced.train_dataset["history_item_id"]) < full.item_counts.sum()
    assert sliced.summary() == {
        "dataset": synthetic.name,
        "items": 40,
        "training rows": 10,
        "evaluation rows": 3,
        "prompt mode": "reference",
    }


def test_each_method_has_a_config_class_and_defaults():
    from trl import DPOConfig, GRPOConfig, RLOOConfig, SFTConfig

    from trl_flower.config import FlowerConfig

    expected = {"flower": FlowerConfig, "sft": SFTConfig, "sdpo": DPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}
    for method, cls in expected.items():
        assert config_class(method) is cls
    assert method_defaults("flower") == {}  # FlowerConfig's own defaults are Flower's
    assert method_defaults("ifair")["learning_rate"] == 3e-4 and method_defaults("dmpo")["beta"] == 0.3
    assert method_defaults("grpo")["remove_unused_columns"] is False
    assert len(METHODS) == 10
    with pytest.raises(ValueError, match="is not one of"):
        config_class("bigrec")


def test_train_checks_the_config_before_loading_anything(synthetic, tmp_path):
    from trl import SFTConfig

    from trl_flower.config import FlowerConfig

    data = recommendation_data(synthetic, _Prompts())
    with pytest.raises(TypeError, match="method 'flower' trains with a FlowerConfig, got SFTConfig"):
        train("flower", tmp_path / "nowhere", data, SFTConfig(output_dir=str(tmp_path), bf16=False))
    sft = SFTConfig(output_dir=str(tmp_path), bf16=False, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match="evaluation during training is wired for method 'flower' only"):
        train("sft", tmp_path / "nowhere", data, sft)
    assert isinstance(FlowerConfig(output_dir=str(tmp_path)), config_class("flower"))


@pytest.mark.trl112
def test_ppo_refuses_lora_before_loading(synthetic, tmp_path):
    data = recommendation_data(synthetic, _Prompts())
    args = config_class("ppo")(output_dir=str(tmp_path), bf16=False)
    with pytest.raises(ValueError, match="not supported for method 'ppo'"):
        train("ppo", tmp_path / "nowhere", data, args, peft_config=object())


def test_a_flower_run_through_the_python_api(tiny_model_dir, tiny_titles, tiny_tokenizer, tmp_path):
    """The README's library call: a Flower run on rows of the tiny catalogue, saved with tree, record and card."""
    from datasets import Dataset

    from trl_flower.config import FlowerConfig

    rows = Dataset.from_dict(
        {
            "prompt": [f"The user has enjoyed the following items before: {t}.\n" for t in tiny_titles[:8]],
            "item_id": list(range(2, 10)),
            "history_item_id": [[i] for i in range(8)],
        }
    )
    data = RunData(items=tiny_titles, train_dataset=rows, name="tiny")
    args = FlowerConfig(
        output_dir=str(tmp_path / "run"),
        flow_lambda=0.5,
        max_steps=1,
        per_device_train_batch_size=4,
        max_completion_length=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    run = train("flower", tiny_model_dir, data, args, reward_smoothing=0.5)
    assert run.output_dir == tmp_path / "run" and run.trainer.state.global_step == 1
    expected = data.counts() + 0.5  # one history occurrence for items 0..7, none for 8 and 9
    np.testing.assert_allclose(run.tree.item_rewards, expected)
    np.testing.assert_allclose(checkpoint.load_tree(run.output_dir).item_rewards, expected)
    assert checkpoint.read_record(run.output_dir)["flow_lambda"] == 0.5
    assert "| `dataset` | tiny |" in checkpoint.model_card_path(run.output_dir).read_text()
    assert run.model is run.trainer.model  # single process: nothing to unwrap


def test_build_trainer_gives_the_trainer_train_would_train(tiny_model_dir, tiny_titles, tiny_tokenizer, tmp_path):
    """build_trainer builds without training or saving; its tree carries the item rewards train would use."""
    from datasets import Dataset

    from trl_flower.config import FlowerConfig
    from trl_flower.run import build_trainer
    from trl_flower.trainer import FlowerTrainer

    rows = Dataset.from_dict({"prompt": ["a\n", "b\n"], "item_id": [1, 2], "history_item_id": [[0, 1], [1]]})
    data = RunData(items=tiny_titles, train_dataset=rows)
    args = FlowerConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
    )
    trainer, tree = build_trainer("flower", tiny_model_dir, data, args, tokenizer=tiny_tokenizer, reward_smoothing=2)
    assert isinstance(trainer, FlowerTrainer) and trainer.state.global_step == 0
    expected = np.full(len(tiny_titles), 2.0)
    expected[:2] += [1, 2]  # item 0 once, item 1 twice in the histories
    np.testing.assert_allclose(tree.item_rewards, expected)
    assert trainer.tree is tree and not checkpoint.has_tree(tmp_path / "run")  # nothing trained or saved
    with pytest.raises(TypeError, match="trains with a FlowerConfig"):
        build_trainer("flower", tiny_model_dir, data, config_class("sft")(output_dir=str(tmp_path), bf16=False))


def test_the_dpo_family_needs_history_counts_for_rosepo_only(tiny_model_dir, tiny_titles, tiny_tokenizer, tmp_path):
    """S-DPO's negatives are uniform: rows without training histories build; RosePO's follow the counts."""
    from datasets import Dataset

    from trl_flower.run import build_trainer

    rows = Dataset.from_dict({"prompt": ["a\n", "b\n"], "item_id": [1, 2]})  # no history_item_id column
    data = RunData(items=tiny_titles, train_dataset=rows)
    args = config_class("sdpo")(output_dir=str(tmp_path), **{**method_defaults("sdpo"), "report_to": "none"})
    trainer, _ = build_trainer("sdpo", tiny_model_dir, data, args, tokenizer=tiny_tokenizer)
    assert trainer.train_dataset.num_rows == 2
    rosepo = config_class("rosepo")(output_dir=str(tmp_path), **{**method_defaults("rosepo"), "report_to": "none"})
    with pytest.raises(ValueError, match="history_item_id"):  # counted from the rows' histories, which are missing
        build_trainer("rosepo", tiny_model_dir, data, rosepo, tokenizer=tiny_tokenizer)
