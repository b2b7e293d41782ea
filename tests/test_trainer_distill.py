"""FlowerTrainer with the distilled per-user reward and with state granularity > 1 (the tiny model of conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_flower import FlowerConfig, FlowerTrainer
from trl_flower.tree import PrefixTree

COUNTS = [5, 1, 9, 3, 3, 7, 2, 4, 6, 1]
NUM_ROWS = 8


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=COUNTS)


@pytest.fixture(scope="module")
def dataset(tiny_titles):
    rows = [
        {"prompt": f"The user liked {tiny_titles[i % 10]}. Next item:\n", "item_id": (3 * i) % 10, "row_index": i}
        for i in range(NUM_ROWS)
    ]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def logits_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("aux") / "train_logits.npy"
    np.save(path, np.random.default_rng(0).normal(size=(NUM_ROWS, 10)).astype(np.float32))
    return path


def config(tmp_path, **kwargs) -> FlowerConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        max_completion_length=8,
        flow_lambda=0.5,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=0,
    )
    return FlowerConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "options",
    [
        dict(reward_variant="distill", distill_alpha=0.5, distill_beta=2.0, distill_temperature=0.5),
        dict(reward_variant="distill", distill_alpha=0.0, distill_top_n=3, flow_loss="full_distribution"),
        dict(reward_variant="distill", state_granularity=3, flow_loss="flower_subtb"),
    ],
)
def test_distilled_training_moves_the_model_and_records_the_settings(
    options, tiny_model_dir, tree, dataset, logits_path, tmp_path
):
    args = config(tmp_path, preference_scores_path=str(logits_path), **options)
    trainer = FlowerTrainer(str(tiny_model_dir), tree, args=args, train_dataset=dataset)
    assert trainer.reward_model.distill == args.distilled_reward()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    flows = [e["flow_loss"] for e in trainer.state.log_history if "flow_loss" in e]
    assert len(flows) == 2 and all(np.isfinite(flows)) and max(flows) > 0
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    trainer.save_model()
    info = json.loads((tmp_path / "out" / "flower_config.json").read_text())
    assert info["distill"]["alpha"] == args.distill_alpha and info["distill"]["top_n"] == args.distill_top_n
    assert info["state_granularity"] == args.state_granularity


def test_state_granularity_changes_the_flow_loss(tiny_model_dir, tree, dataset, tmp_path):
    """Same model, batch and samples: token states and 3-token states give different SubTB values (control that
    the option reaches the loss), and 1 reproduces the default run exactly."""
    losses = {}
    for n in (1, 3):
        args = config(tmp_path / str(n), max_steps=1, state_granularity=n)
        trainer = FlowerTrainer(str(tiny_model_dir), tree, args=args, train_dataset=dataset)
        trainer.train()
        losses[n] = [e["flow_loss"] for e in trainer.state.log_history if "flow_loss" in e][0]
    default = FlowerTrainer(str(tiny_model_dir), tree, args=config(tmp_path / "d", max_steps=1), train_dataset=dataset)
    default.train()
    assert [e["flow_loss"] for e in default.state.log_history if "flow_loss" in e][0] == losses[1]
    assert losses[3] != losses[1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(distill_alpha=0.5), "only apply to reward_variant='distill'"),
        (dict(reward_variant="distill", distill_temperature=0.0), "distill_temperature"),
        (dict(reward_variant="distill", distill_beta=-1.0), "distill_beta"),
        (dict(reward_variant="distill", distill_top_n=-3), "distill_top_n"),
        (dict(nonterminal_log_term=5.0), "nonterminal_log_term=5.0"),
    ],
)
def test_config_rejects_bad_distill_settings(tmp_path, logits_path, kwargs, match):
    if kwargs.get("reward_variant") == "distill":
        kwargs = {**kwargs, "preference_scores_path": str(logits_path)}
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)
