"""Online RL baselines (RLOO, GRPO; PPO on trl 1.11/1.12) with the SASRec reward and trie-constrained rollouts.

`trl_flower.baselines.online_rl`: the reward is checked against hand-computed min-max SASRec scores; RLOO and GRPO
train 2 steps from the saved runs of `baseline_setup.py` (Flower as KL reference); every rollout is a catalogue item
(the one rollout hook, `trl_flower.rollout.TrieRolloutMixin`). The PPO test needs trl 1.11/1.12:
``.venv112/bin/python -m pytest -m trl112 tests/test_online_rl.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trl
from baseline_setup import COUNTS, TINY, params, preference_rows

from trl_flower.baselines.online_rl import (
    TrieConstrainedGRPOTrainer,
    TrieConstrainedRLOOTrainer,
    sasrec_reward,
    train_online_rl,
)
from trl_flower.rollout import TrieRolloutMixin
from trl_flower.tree import PrefixTree

HAS_PPO = ".".join(trl.__version__.split(".")[:2]) in ("1.11", "1.12")


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=COUNTS)


@pytest.fixture(scope="module")
def ckpts(baseline_checkpoints):
    return baseline_checkpoints


@pytest.fixture(scope="module")
def rows(tiny_titles):
    return preference_rows(tiny_titles)


def title_ids(tree):
    return np.asarray(tree.item_node)


# ------------------------------------------------------------------------------------------------ SASRec reward


SCORES = torch.tensor(
    [  # SASRec logits [rows, items] for 4 training rows
        [2.0, 0.0, 1.0, 0.5, -1.0, 0.0, 0.3, -0.2, 1.5, 0.1],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0],
        [-1.0, 1.0, 0.2, 2.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ],
    dtype=torch.float64,
)


def _hand_reward(row: int, item: int, tree) -> float:
    """min-max normalised softmax score of the item for the row; duplicate titles: mean over their ids."""
    p = torch.softmax(SCORES[row], 0)
    if p.max() == p.min():
        return 1.0
    s = (p - p.min()) / (p.max() - p.min())
    t = title_ids(tree)
    return float(s[torch.as_tensor(t == t[item])].mean())


def test_sasrec_reward_is_minmax_softmax_score(tree, tiny_tokenizer):
    reward = sasrec_reward(tree, SCORES)
    paths = [tree.item_paths(torch.tensor([i]))[0][0].tolist() for i in (0, 9, 3, 8)]
    got = reward(prompts=[""] * 4, completions=[""] * 4, completion_ids=paths, row_index=[0, 1, 2, 0])
    # row 0, item 0: the row's max ⇒ 1; row 1 item 9 ⇒ 1; row 2 "Blue Train" (ids 3, 4) ⇒ mean of their scores
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(1.0)
    assert got[2] == pytest.approx(_hand_reward(2, 3, tree)) and 0 < got[2] < 1
    p0 = torch.softmax(SCORES[0], 0)
    assert got[3] == pytest.approx(float((p0[8] - p0[4]) / (p0[0] - p0[4])))  # by hand: (p8 − min) / (max − min)


def _record_rewards(trainer):
    calls = []
    original = trainer.reward_funcs[0]

    def recorder(prompts, completions, completion_ids=None, **kwargs):
        out = original(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        calls.append((completion_ids, list(kwargs["row_index"]), out))
        return out

    recorder.__name__ = original.__name__
    trainer.reward_funcs[0] = recorder
    return calls


@pytest.mark.parametrize(("method", "init"), [("rloo", "flower"), ("rloo", "sft"), ("grpo", "sft")])
def test_online_rl_constrained_rollouts_get_sasrec_reward(method, init, ckpts, tree, rows, tmp_path):
    """RLOO/GRPO: every rollout is an item, its reward is the hand-computed SASRec score; reference = Flower."""
    trainer = train_online_rl(
        method,
        ckpts[init],
        ckpts["flower"],
        rows,
        tmp_path,
        preference_scores=SCORES,
        train=False,
        num_generations=2,
        beta=0.05,
        **{**TINY, "per_device_train_batch_size": 4},
    )
    calls = _record_rewards(trainer)
    before = params(trainer.model)
    trainer.train()
    assert calls
    eos = tree.terminator_id
    for completion_ids, row_idx, out in calls:
        for ids, r, value in zip(completion_ids, row_idx, out):
            ids = list(ids)
            assert ids[-1] == eos
            node = tree.walk(torch.tensor([ids]))[0, -1]
            item = int(tree.terminal_item(node.view(1)))
            assert item >= 0  # a complete catalogue item
            assert value == pytest.approx(_hand_reward(r, item, tree), abs=1e-9)
    kl = [e["kl"] for e in trainer.state.log_history if "kl" in e]
    assert (kl[0] == pytest.approx(0.0, abs=1e-6)) == (init == "flower")
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


@pytest.mark.skipif(HAS_PPO, reason="trl has experimental PPO here; covered by the trl112 test")
def test_ppo_fails_clearly_without_experimental_ppo(ckpts, rows, tmp_path):
    from trl_flower.chain import PPOUnavailableError

    with pytest.raises(PPOUnavailableError, match="1.12"):
        train_online_rl("ppo", ckpts["flower"], None, rows, tmp_path, preference_scores=SCORES)


@pytest.mark.trl112
@pytest.mark.skipif(not HAS_PPO, reason=f"needs trl 1.11/1.12 (experimental PPO), installed {trl.__version__}")
def test_ppo_with_sasrec_reward(ckpts, tree, rows, tmp_path):
    """PPO: each rollout is an item and its reward is the hand-computed min-max SASRec score of its prompt's row."""
    trainer = train_online_rl(
        "ppo",
        ckpts["sft"],
        ckpts["flower"],
        rows,
        tmp_path,
        preference_scores=SCORES,
        train=False,
        total_episodes=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        num_mini_batches=1,
        local_rollout_forward_batch_size=4,
        num_sample_generations=0,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    scorer = trainer.reward_model
    seen = []
    original = scorer.get_reward

    def recording(query_responses, pad_token_id, context_length):
        logits, final, end = original(query_responses, pad_token_id, context_length)
        seen.append((query_responses[:, context_length:].clone(), list(scorer._rows), final.clone()))
        return logits, final, end

    scorer.get_reward = recording
    before = params(trainer.policy_model)
    trainer.train()
    assert seen
    pad = trainer.processing_class.pad_token_id
    for responses, row_idx, final in seen:
        for resp, r, value in zip(responses.tolist(), row_idx, final.tolist()):
            ids = [t for t in resp if t != pad]
            node = tree.walk(torch.tensor([ids]))[0, -1]
            item = int(tree.terminal_item(node.view(1)))
            assert item >= 0
            assert value == pytest.approx(_hand_reward(r, item, tree), abs=1e-6)
    assert sorted({r for _, rs, _ in seen for r in rs}) == [0, 1, 2, 3]
    scores = [e["objective/scores"] for e in trainer.state.log_history if "objective/scores" in e]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy_model.named_parameters())


def test_constrained_trainers_use_the_one_rollout_hook():
    """RLOO, GRPO and FlowerTrainer share TrieRolloutMixin's `_generate_single_turn` (no per-class copies)."""
    from trl_flower.trainer import FlowerTrainer

    for cls in (TrieConstrainedGRPOTrainer, TrieConstrainedRLOOTrainer, FlowerTrainer):
        assert cls.__mro__[1] is TrieRolloutMixin
        assert cls._generate_single_turn is TrieRolloutMixin._generate_single_turn


def test_online_rl_rejects_a_config_that_drops_the_row_index(ckpts, rows, tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        train_online_rl(
            "grpo",
            ckpts["sft"],
            None,
            rows,
            tmp_path,
            preference_scores=SCORES,
            train=False,
            remove_unused_columns=True,
            num_generations=2,
            **{**TINY, "per_device_train_batch_size": 4},
        )
