r"""The SASRec-reward online RL baselines: RLOO, GRPO (TRL's trainers) and PPO (trl 1.11/1.12's experimental one).

The paper's PPO reward (flower_reference.md §4) is the min-max-normalised SASRec softmax score of the sampled title
for the prompt's training row. :class:`~trl_flower.rewards.PrefixTreeRewardModel` with ``preference_scores`` =
SASRec logits, ``sequence_reward="minmax"`` and item rewards that give every *title* the same R is exactly that
(:func:`sasrec_reward`): R's min-max factor is then 1 and the reward is s_minmax(u, y).

Rollouts are trie-constrained, so every sample is a catalogue item: RLOO and GRPO through the one rollout hook
(:class:`~trl_flower.rollout.TrieRolloutMixin`: :class:`TrieConstrainedRLOOTrainer`,
:class:`TrieConstrainedGRPOTrainer`), PPO through `trl_flower.chain.make_ppo_trainer` (PPO generates in a
module-level function of TRL, which the chain module wraps).

Entry point: :func:`train_online_rl` (``method in {"rloo", "grpo", "ppo"}``); it takes a Flower or an SFT checkpoint
as policy init and any checkpoint (default: the policy init) as KL reference. `trl_flower.run.train` builds these
runs for the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer, RLOOTrainer

from trl_flower import checkpoint
from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.rollout import TrieRolloutMixin
from trl_flower.tree import PrefixTree

__all__ = [
    "OFFICIAL_PPO_ARGS",
    "ONLINE_METHODS",
    "TrieConstrainedGRPOTrainer",
    "TrieConstrainedRLOOTrainer",
    "sasrec_reward",
    "train_online_rl",
]

ONLINE_METHODS = ("rloo", "grpo", "ppo")
OFFICIAL_PPO_ARGS = dict(
    learning_rate=1e-7,
    per_device_train_batch_size=4,
    num_mini_batches=2,
    num_ppo_epochs=1,
    kl_coef=0.9,
    stop_token="eos",
    missing_eos_penalty=None,
)
"""The official PPO script's settings where TRL's `PPOConfig` has the knob (lr 1e-7, batch 4, 2 mini-batches, 1 PPO
epoch, KL coefficient 0.9); ``stop_token="eos"`` ends responses at the item's terminator."""


def sasrec_reward(tree: PrefixTree, preference_scores, tokenizer=None, row_column: str = "row_index"):
    """The paper's PPO reward as a :class:`~trl_flower.rewards.PrefixTreeRewardModel`.

    reward(u, y) = (p_u(y) − min_i p_u(i)) / (max_i p_u(i) − min_i p_u(i)), p_u = softmax of the SASRec logits of
    training row u (``preference_scores[u]``, [num_rows, num_items]). Item rewards are 1 / (#ids with that title), so
    every title has R(y) = 1 and the minmax factor of ``sequence_reward="minmax"`` is 1; a duplicate title gets the
    mean score of its ids. Off-catalogue completions get 0 (never happens with constrained rollouts).
    """
    titles = np.asarray(tree.item_node, dtype=np.int64)  # a title id per item: ids sharing a path share a node
    per_title = np.bincount(titles, minlength=int(titles.max()) + 1)[titles]  # [M] ids sharing each item's title
    return PrefixTreeRewardModel(
        tree,
        item_rewards=1.0 / per_title,
        preference_scores=preference_scores,
        sequence_reward="minmax",
        score_normalization="minmax",
        tokenizer=tokenizer,
        row_column=row_column,
    )


class TrieConstrainedGRPOTrainer(TrieRolloutMixin, GRPOTrainer):
    """[`GRPOTrainer`] whose rollouts are catalogue items of `rollout_tree` (the only change; see `TrieRolloutMixin`).

    Args:
        *args, **kwargs: `GRPOTrainer`'s.
        rollout_tree ([`PrefixTree`]): the catalogue's prefix tree over the policy's tokens.
    """

    def __init__(self, *args: Any, rollout_tree: PrefixTree, **kwargs: Any) -> None:
        self.rollout_tree = rollout_tree
        super().__init__(*args, **kwargs)


class TrieConstrainedRLOOTrainer(TrieRolloutMixin, RLOOTrainer):
    """[`RLOOTrainer`] whose rollouts are catalogue items of `rollout_tree` (the only change; see `TrieRolloutMixin`).

    Args:
        *args, **kwargs: `RLOOTrainer`'s.
        rollout_tree ([`PrefixTree`]): the catalogue's prefix tree over the policy's tokens.
    """

    def __init__(self, *args: Any, rollout_tree: PrefixTree, **kwargs: Any) -> None:
        self.rollout_tree = rollout_tree
        super().__init__(*args, **kwargs)


def _ppo_row_scorer(reward: PrefixTreeRewardModel, pad_token_id: int, prompt_rows: dict[tuple, int]):
    """A :class:`~trl_flower.chain.TreeRewardScorer` that finds each query's training row from its prompt tokens.

    PPO's reward call sees only token ids; the personalised SASRec reward needs the row. The prompt token ids
    (without padding) map to the row they were built from (the first row for duplicate prompts, which have the same
    history and hence the same SASRec scores up to history truncation).
    """
    from trl_flower.chain import TreeRewardScorer

    class RowTreeRewardScorer(TreeRewardScorer):
        def get_reward(self, query_responses, pad_token_id, context_length):
            queries = query_responses[:, :context_length]
            rows = []
            for q in queries.tolist():
                key = tuple(t for t in q if t != pad_token_id)
                if key not in self.prompt_rows:
                    raise KeyError("a PPO query does not match any training prompt; cannot find its SASRec row")
                rows.append(self.prompt_rows[key])
            self._rows = rows
            return super().get_reward(query_responses, pad_token_id, context_length)

        def forward(self, completion_ids):
            n = len(completion_ids)
            scores = self.reward(
                prompts=[""] * n,
                completions=[""] * n,
                completion_ids=completion_ids,
                **{self.reward.row_column: self._rows},
            )
            return torch.tensor(scores, dtype=torch.float32, device=self.anchor.device)

    stand_in = PrefixTreeRewardModel(reward.tree)  # TreeRewardScorer refuses personalised rewards at construction
    scorer = RowTreeRewardScorer(stand_in, pad_token_id)
    scorer.reward = reward
    scorer.prompt_rows = prompt_rows
    return scorer


def train_online_rl(
    method: str,
    model_path: str | os.PathLike,
    ref_path: str | os.PathLike | None,
    dataset,
    output_dir: str | os.PathLike,
    *,
    preference_scores,
    tree: PrefixTree | str | os.PathLike | None = None,
    titles: Sequence[str] | None = None,
    tokenizer=None,
    train: bool = True,
    save: bool = True,
    peft_config: Any = None,
    args: Any = None,
    **config_kwargs: Any,
):
    """RLOO / GRPO (trl ≥ 1.12) or PPO (trl 1.11/1.12 only) with the SASRec reward and trie-constrained rollouts.

    Args:
        method: ``"rloo"``, ``"grpo"`` or ``"ppo"``.
        model_path: policy init (Flower or SFT checkpoint).
        ref_path: KL reference; ``None`` = `model_path`. For RLOO/GRPO a different reference is installed with
            :func:`trl_flower.chain.set_reference_policy` (needs ``beta > 0``).
        dataset: ``datasets.Dataset`` with ``prompt`` (strings) and ``row_index`` (row of `preference_scores`).
        output_dir: output directory.
        preference_scores: SASRec logits [num_rows, num_items] (array, memmap or tensor).
        tree / titles / tokenizer: the prefix tree (object or ``.npz`` path; default `titles`, else the tree saved
            in the policy or reference directory); the tokenizer defaults to the policy's (left padding).
        train, save: run ``trainer.train()`` (and save to `output_dir`, `trl_flower.run.finish_run`); ``False``
            returns the built trainer.
        peft_config: e.g. ``peft.LoraConfig(...)`` for RLOO / GRPO (passed to the trainer); not supported for PPO.
        args: a ready ``RLOOConfig`` / ``GRPOConfig`` / ``PPOConfig`` (then `config_kwargs` must be empty).
        **config_kwargs: fields of that config. RLOO/GRPO default ``max_completion_length`` to the longest item
            path and ``remove_unused_columns=False``; PPO defaults to :data:`OFFICIAL_PPO_ARGS` and
            ``response_length`` = the longest item path.

    Returns:
        The trainer. PPO on a trl without ``trl.experimental.ppo`` raises
        :class:`trl_flower.chain.PPOUnavailableError`.
    """
    from transformers import AutoTokenizer

    method = str(method).lower()
    if method not in ONLINE_METHODS:
        raise ValueError(f"method must be one of {ONLINE_METHODS}, got {method!r}")
    if args is not None and config_kwargs:
        raise ValueError(f"pass either args= or config keyword arguments, not both (got {sorted(config_kwargs)})")
    if method == "ppo":
        from trl_flower.chain import require_ppo

        require_ppo()  # fail before any loading on a trl without PPO
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tree = checkpoint.resolve_tree(tree, titles=titles, tokenizer=tokenizer, model_dirs=(model_path, ref_path))
    reward = sasrec_reward(tree, preference_scores, tokenizer=tokenizer)
    if "row_index" not in dataset.column_names:
        raise ValueError("the dataset needs a `row_index` column (row of preference_scores for each prompt)")
    longest = int(tree.item_length.max())
    if method == "ppo":
        if peft_config is not None:
            raise ValueError("peft_config is not supported for method='ppo' here; pass it to make_ppo_trainer")
        if args is None:
            from trl.experimental.ppo import PPOConfig

            args = PPOConfig(
                output_dir=str(output_dir), **{**OFFICIAL_PPO_ARGS, "response_length": longest, **config_kwargs}
            )
        if args.response_length < longest:
            raise ValueError(
                f"response_length={args.response_length} is shorter than the longest item path ({longest} tokens "
                f"with the terminator), so some rollouts would be cut before their item ends; set response_length >= "
                f"{longest}."
            )
        trainer = _make_ppo(model_path, ref_path, dataset, reward, tokenizer, args)
    else:
        from trl_flower.chain import set_reference_policy

        if args is None:
            if method == "grpo":
                from trl import GRPOConfig as Config
            else:
                from trl import RLOOConfig as Config
            kwargs = {"max_completion_length": longest, "remove_unused_columns": False, **config_kwargs}
            args = Config(output_dir=str(output_dir), **kwargs)
        _check_rollout_config(args, longest)
        cls = TrieConstrainedGRPOTrainer if method == "grpo" else TrieConstrainedRLOOTrainer
        trainer = cls(
            model=str(model_path),
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            rollout_tree=tree,
        )
        if ref_path is not None and Path(ref_path).resolve() != Path(model_path).resolve():
            set_reference_policy(trainer, ref_path)
    if train:
        from trl_flower.run import finish_run

        finish_run(trainer, output_dir if save else None, tokenizer=tokenizer, tree=tree, method=method)
    return trainer


def _check_rollout_config(args: Any, longest: int) -> None:
    """A GRPO/RLOO config that trie-constrained rollouts with the SASRec reward can use."""
    if getattr(args, "use_vllm", False):
        raise ValueError("trie-constrained rollouts use transformers generation; set use_vllm=False")
    if args.max_completion_length is not None and args.max_completion_length < longest:
        raise ValueError(
            f"max_completion_length={args.max_completion_length} is shorter than the longest item path ({longest} "
            f"tokens with the terminator); set max_completion_length >= {longest}"
        )
    if args.remove_unused_columns:
        raise ValueError(
            "remove_unused_columns=True would drop the `row_index` column, which the SASRec reward reads to find "
            "each prompt's scores; set remove_unused_columns=False"
        )


def _make_ppo(model_path, ref_path, dataset, reward, tokenizer, args):
    from trl_flower.chain import make_ppo_trainer

    prompts = list(dataset["prompt"])
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_rows: dict[tuple, int] = {}
    for p, r in zip(ids, dataset["row_index"]):
        prompt_rows.setdefault(tuple(p), int(r))
    trainer = make_ppo_trainer(
        args,
        model=str(model_path),
        ref_model=str(ref_path if ref_path is not None else model_path),
        reward=PrefixTreeRewardModel(reward.tree),
        train_dataset=dataset.select_columns(["prompt"]),
        processing_class=tokenizer,
    )
    scorer = _ppo_row_scorer(reward, tokenizer.pad_token_id, prompt_rows).to(trainer.accelerator.device)
    trainer.reward_model = scorer
    return trainer
