"""One way to build a training run: (data, model, tree/rewards, config) -> a trained, saved run.

`trl-flower train`, `trl-flower demo` and ``examples/flower_cds.py`` build their runs here::

    from trl_flower import FlowerConfig
    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.run import recommendation_data, train

    data = recommendation_data(load_amazon("CDs_and_Vinyl"), PromptBuilder.from_dataset("CDs_and_Vinyl"))
    run = train("flower", "Qwen/Qwen2.5-1.5B-Instruct", data, FlowerConfig(output_dir="out", flow_lambda=0.005))

Every method takes its own TRL config (:func:`config_class`): `FlowerConfig` (``flower``), ``SFTConfig`` (``sft``,
``ifair``), ``DPOConfig`` (``dpo``, ``sdpo``, ``dmpo``, ``rosepo``), ``GRPOConfig`` (``grpo``), ``RLOOConfig``
(``rloo``), ``PPOConfig`` (``ppo``, trl 1.11/1.12 only); :func:`method_defaults` holds the official settings a
method starts from. :func:`train` builds the method's trainer (:func:`build_trainer`) from the data, the catalogue's
prefix tree (built from the titles with the model's tokenizer unless given) and, for Flower, the item rewards
(interaction counts in the training histories + ``reward_smoothing``); :func:`finish_run` trains it (resuming from
``resume_from_checkpoint``), saves the model, tokenizer, tree and Flower record (`trl_flower.checkpoint`), writes the
model card (`trl_flower.model_card`) and pushes to the Hub when ``push_to_hub`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trl_flower import checkpoint
from trl_flower.model_card import write_model_card
from trl_flower.tree import PrefixTree

__all__ = [
    "METHODS",
    "ONLINE_METHODS",
    "PREFERENCE_METHODS",
    "SFT_METHODS",
    "RunData",
    "TrainedRun",
    "build_trainer",
    "check_method",
    "config_class",
    "evaluates",
    "finish_run",
    "load_tokenizer",
    "method_defaults",
    "recommendation_data",
    "train",
]

SFT_METHODS = ("sft", "ifair")
PREFERENCE_METHODS = ("dpo", "sdpo", "dmpo", "rosepo")
ONLINE_METHODS = ("rloo", "grpo", "ppo")
METHODS = (*SFT_METHODS, "flower", *PREFERENCE_METHODS, *ONLINE_METHODS)


def check_method(method: str) -> str:
    """`method` if it is one of :data:`METHODS`, else a ValueError listing them."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}; pick one of them (docs/baselines.md)")
    return method


def config_class(method: str) -> type:
    """The TRL config class `method` trains with (imports TRL)."""
    method = check_method(method)
    if method == "flower":
        from trl_flower.config import FlowerConfig

        return FlowerConfig
    if method in SFT_METHODS:
        from trl import SFTConfig

        return SFTConfig
    if method in PREFERENCE_METHODS:
        from trl import DPOConfig

        return DPOConfig
    if method == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    if method == "rloo":
        from trl import RLOOConfig

        return RLOOConfig
    from trl_flower.chain import require_ppo

    return require_ppo().PPOConfig  # raises PPOUnavailableError on a trl without PPO


def method_defaults(method: str) -> dict[str, Any]:
    """The config values `method` starts from where they differ from its config class's defaults.

    The official settings of the baselines (`baselines.sft.official_sft_args`, `baselines.preference
    .official_dpo_args`, `baselines.online_rl.OFFICIAL_PPO_ARGS`; RLOO/GRPO keep the ``row_index`` column for the
    SASRec reward), and bf16 only where the hardware supports it (TRL's configs default to bf16, which fails on a
    CPU; `FlowerConfig` already decides this itself). The command line applies them as parser defaults, so a recipe
    or a flag overrides each of them.
    """
    method = check_method(method)
    if method == "flower":
        return {}
    from transformers.utils import is_torch_bf16_gpu_available

    defaults: dict[str, Any] = {"bf16": is_torch_bf16_gpu_available()}
    if method in SFT_METHODS:
        from trl_flower.baselines.sft import official_sft_args

        defaults.update(official_sft_args())
    elif method in PREFERENCE_METHODS:
        from trl_flower.baselines.preference import official_dpo_args

        defaults.update(official_dpo_args(method))
    elif method == "ppo":
        from trl_flower.baselines.online_rl import OFFICIAL_PPO_ARGS

        defaults.update(OFFICIAL_PPO_ARGS)
    else:
        defaults["remove_unused_columns"] = False
    return defaults


def load_tokenizer(model: str | os.PathLike, method: str, **kwargs: Any):
    """The tokenizer a run of `method` uses: the model's, left-padded for RLOO/GRPO/PPO, pad = EOS if it has none.

    Args:
        model: the model directory or Hub id.
        method: the training method.
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (``revision``, ``trust_remote_code``).
    """
    from transformers import AutoTokenizer

    if check_method(method) in ONLINE_METHODS:
        kwargs = {"padding_side": "left", **kwargs}
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(model), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class RunData:
    """What a run learns from: the catalogue and the training rows (`recommendation_data` builds it).

    Attributes:
        items: the catalogue's titles; item id = index.
        train_dataset: training rows with ``prompt`` and ``item_id``; ``row_index`` (personalised Flower rewards,
            online RL); ``history_item_id``, ``history_item_title`` and ``item_title`` (item counts, IFairLRS).
        item_counts: interactions per item id in the training histories [num_items] (Flower's item rewards and
            RosePO's negative weights); None: counted from ``train_dataset``'s ``history_item_id``.
        item_groups: popularity group per item id [num_items] (Flower's sampled-group logs), or None.
        eval_dataset: rows like `train_dataset` for evaluation during training (Flower only), or None.
        name: the dataset's name (model card).
        prompt_mode: ``"reference"`` (plain-text prompts, tokenised with special tokens) or ``"chat"`` (rendered with
            the chat template, tokenised without).
    """

    items: Sequence[str]
    train_dataset: Any
    item_counts: np.ndarray | None = None
    item_groups: np.ndarray | None = None
    eval_dataset: Any = None
    name: str | None = None
    prompt_mode: str = "reference"

    def counts(self) -> np.ndarray:
        """`item_counts`, or the interactions per item counted in the training rows' histories."""
        if self.item_counts is not None:
            return np.asarray(self.item_counts, dtype=np.float64)
        from trl_flower.data.popularity import history_item_counts

        return history_item_counts(self.train_dataset["history_item_id"], len(self.items)).astype(np.float64)

    def summary(self) -> dict[str, Any]:
        """The training-data table of the model card."""
        rows = {"dataset": self.name, "items": len(self.items), "training rows": self.train_dataset.num_rows}
        if self.eval_dataset is not None:
            rows["evaluation rows"] = self.eval_dataset.num_rows
        return {**rows, "prompt mode": self.prompt_mode}


def recommendation_data(
    data: Any,
    builder: Any,
    *,
    max_train_rows: int | None = None,
    eval_split: str | None = None,
    max_eval_rows: int | None = None,
) -> RunData:
    """`RunData` from an Amazon-format dataset (`load_amazon`, `make_synthetic`) and a `PromptBuilder`.

    Item counts and popularity groups come from the *full* training split (the catalogue's statistics), whatever
    `max_train_rows` keeps for training.

    Args:
        data: an `AmazonData` with a ``train`` split (and `eval_split`, if given).
        builder: the `PromptBuilder` that turns a history into a prompt (its mode is the run's prompt mode).
        max_train_rows: train on the first N rows only (None: all).
        eval_split: a split to evaluate on during training (``"valid"``), or None.
        max_eval_rows: evaluate on its first N rows only (None: all).
    """
    from trl_flower.data.popularity import history_item_counts, popularity_from_histories

    full = data.splits["train"]
    train_rows = full if max_train_rows is None else full.select(range(min(max_train_rows, full.num_rows)))
    eval_rows = None
    if eval_split is not None:
        eval_rows = data.splits[eval_split]
        if max_eval_rows is not None:
            eval_rows = eval_rows.select(range(min(max_eval_rows, eval_rows.num_rows)))
        eval_rows = builder.add_prompts(eval_rows)
    popularity = popularity_from_histories(full["history_item_title"])
    return RunData(
        items=list(data.items),
        train_dataset=builder.add_prompts(train_rows),
        item_counts=history_item_counts(full["history_item_id"], data.num_items),
        item_groups=popularity.item_groups(data.items),
        eval_dataset=eval_rows,
        name=data.name,
        prompt_mode=builder.mode,
    )


# ------------------------------------------------------------------------------------------------------------ runs


@dataclass
class TrainedRun:
    """A trained (and, unless ``save=False``, saved) run.

    Attributes:
        method: the method it trained with.
        trainer: the TRL trainer (its ``state.log_history`` holds the logs).
        output_dir: where the run was saved (None if not saved).
        tree: the catalogue's prefix tree (for Flower: with the item rewards it trained with).
        result: ``trainer.train()``'s output (None for PPO, whose ``train`` returns nothing).
    """

    method: str
    trainer: Any
    output_dir: Path | None
    tree: PrefixTree
    result: Any

    @property
    def model(self):
        """The trained model (unwrapped from DeepSpeed / DDP)."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)


def train(
    method: str,
    model: str | os.PathLike,
    data: RunData,
    args: Any,
    *,
    tree: PrefixTree | None = None,
    tokenizer: Any = None,
    item_rewards: Sequence[float] | np.ndarray | None = None,
    reward_smoothing: float = 1.0,
    reward_model: Any = None,
    peft_config: Any = None,
    ref_model: str | os.PathLike | None = None,
    reward_scores: Any = None,
    num_negatives: int | None = None,
    negative_seed: int = 0,
    callbacks: Sequence[Any] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    save: bool = True,
) -> TrainedRun:
    """Train `model` on `data` with `method` and save the run to ``args.output_dir``.

    :func:`build_trainer` builds the trainer (its arguments are documented there), :func:`finish_run` trains and
    saves it.

    Args:
        method, model, data, args, tree, tokenizer, item_rewards, reward_smoothing, reward_model, peft_config,
            ref_model, reward_scores, num_negatives, negative_seed, callbacks: see :func:`build_trainer`.
        resume_from_checkpoint: a checkpoint directory, or True for the last one in ``args.output_dir``; default:
            ``args.resume_from_checkpoint`` (``"true"`` there means True).
        save: save the run (model, tokenizer, tree, Flower record, model card) to ``args.output_dir``.

    Returns:
        The :class:`TrainedRun`.
    """
    method = _check_run(method, args, peft_config, data)  # before anything is loaded
    if tokenizer is None:  # loaded here, not only in build_trainer: finish_run saves it beside the weights
        tokenizer = load_tokenizer(model, method)
    trainer, tree = build_trainer(
        method,
        model,
        data,
        args,
        tree=tree,
        tokenizer=tokenizer,
        item_rewards=item_rewards,
        reward_smoothing=reward_smoothing,
        reward_model=reward_model,
        peft_config=peft_config,
        ref_model=ref_model,
        reward_scores=reward_scores,
        num_negatives=num_negatives,
        negative_seed=negative_seed,
        callbacks=callbacks,
    )
    out = Path(args.output_dir) if save else None
    result = finish_run(
        trainer,
        out,
        tokenizer=tokenizer,
        tree=tree,
        method=method,
        resume_from_checkpoint=resume_from_checkpoint,
        dataset_name=data.name,
        data=data.summary(),
    )
    return TrainedRun(method=method, trainer=trainer, output_dir=out, tree=tree, result=result)


def build_trainer(
    method: str,
    model: str | os.PathLike,
    data: RunData,
    args: Any,
    *,
    tree: PrefixTree | None = None,
    tokenizer: Any = None,
    item_rewards: Sequence[float] | np.ndarray | None = None,
    reward_smoothing: float = 1.0,
    reward_model: Any = None,
    peft_config: Any = None,
    ref_model: str | os.PathLike | None = None,
    reward_scores: Any = None,
    num_negatives: int | None = None,
    negative_seed: int = 0,
    callbacks: Sequence[Any] | None = None,
) -> tuple[Any, PrefixTree]:
    """The trainer of a run of `method`, built but not trained (:func:`train` trains and saves it).

    For driving the trainer yourself (a benchmark timing its steps, a custom loop); :func:`finish_run` then trains
    and saves it as :func:`train` does.

    Args:
        method: one of :data:`METHODS`.
        model: the model to start from: a local directory or a Hub id (TRL loads it, with
            ``args.model_init_kwargs``).
        data: the catalogue and the training rows (:func:`recommendation_data`). DPO family: rows with ``prompt``
            and ``item_id`` (negatives are sampled), or a ready preference dataset (``prompt_ids`` column,
            `baselines.preference.build_preference_dataset`), used as is.
        args: the method's config (:func:`config_class`), e.g. ``FlowerConfig(output_dir=..., ...)``.
        tree: the catalogue's prefix tree over the model's tokens; default: built from ``data.items`` with the
            tokenizer (terminator: its EOS).
        tokenizer: default: the model's (left padding for RLOO/GRPO/PPO; pad = EOS if it has no pad token).
        item_rewards: Flower's item rewards R(i) [num_items]; default ``data.counts() + reward_smoothing``.
        reward_smoothing: added to the interaction counts (keeps never-seen items reachable; 0 = raw counts).
        reward_model: Flower: a ready `PrefixTreeRewardModel` on the reward tree (instead of the config's reward
            fields).
        peft_config: e.g. ``trl.get_peft_config(model_args)`` (LoRA); not for PPO.
        ref_model: DPO family / RLOO / GRPO / PPO: the frozen reference (default: `model`).
        reward_scores: RLOO / GRPO / PPO: the SASRec logits of the training rows [rows, items] (array or ``.npy``).
        num_negatives: DPO family: negatives per row (default: the method's official number).
        negative_seed: DPO family: seed of the negative sampler.
        callbacks: extra ``TrainerCallback``s.

    Returns:
        ``(trainer, tree)``: the TRL trainer and the catalogue's prefix tree (for Flower: with the item rewards it
        trains with).
    """
    method = _check_run(method, args, peft_config, data)
    model = os.fspath(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(model, method)
    if tree is None:
        tree = PrefixTree.from_titles(list(data.items), tokenizer)

    if method == "flower":
        from trl_flower.trainer import FlowerTrainer

        rewards = data.counts() + reward_smoothing if item_rewards is None else np.asarray(item_rewards, np.float64)
        tree = tree.with_rewards(rewards)
        trainer = FlowerTrainer(
            model=model,
            tree=tree,
            args=args,
            train_dataset=_flower_columns(data.train_dataset, args),
            eval_dataset=None if data.eval_dataset is None else _flower_columns(data.eval_dataset, args),
            processing_class=tokenizer,
            reward_model=reward_model,
            item_groups=data.item_groups,
            peft_config=peft_config,
        )
    else:
        trainer = _baseline_trainer(
            method,
            model,
            data,
            args,
            tree=tree,
            tokenizer=tokenizer,
            peft_config=peft_config,
            ref_model=ref_model,
            reward_scores=reward_scores,
            num_negatives=num_negatives,
            negative_seed=negative_seed,
        )
    for callback in callbacks or ():
        trainer.add_callback(callback)
    return trainer, tree


def _check_run(method: str, args: Any, peft_config: Any, data: RunData) -> str:
    """`method`, checked with its config, PEFT setting and training rows (cheap; each error names the fix)."""
    method = check_method(method)
    expected = config_class(method)
    if not isinstance(args, expected):
        raise TypeError(
            f"method {method!r} trains with a {expected.__name__}, got {type(args).__name__}; build the config with "
            f"trl_flower.run.config_class({method!r})(output_dir=..., **trl_flower.run.method_defaults({method!r}))"
        )
    if method != "flower" and evaluates(args):
        raise ValueError(
            f"eval_strategy={args.eval_strategy!r}: evaluation during training is wired for method 'flower' only; "
            f"set eval_strategy='no' for {method!r} and evaluate the saved run with `trl-flower evaluate`"
        )
    if method == "ppo" and peft_config is not None:
        raise ValueError("PEFT (LoRA) is not supported for method 'ppo'; drop peft_config (--use_peft)")
    if hasattr(data.train_dataset, "__len__") and len(data.train_dataset) == 0:
        raise ValueError(
            f"data.train_dataset has no rows, so method {method!r} has nothing to train on (it would take 0 steps "
            "and save the starting model as if trained). Check the training split and max_train_rows."
        )
    return method


def evaluates(args: Any) -> bool:
    """Whether a training config evaluates during training (``eval_strategy`` other than ``"no"``)."""
    strategy = getattr(args, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no"


def _flower_columns(dataset: Any, args: Any) -> Any:
    """The columns FlowerTrainer reads (prompt, target item, preference row, reference-mode completion)."""
    wanted = ["prompt", args.item_id_column, args.row_index_column, "completion"]
    return dataset.select_columns([c for c in dict.fromkeys(wanted) if c in dataset.column_names])


def _baseline_trainer(
    method: str,
    model: str,
    data: RunData,
    args: Any,
    *,
    tree: PrefixTree,
    tokenizer: Any,
    peft_config: Any,
    ref_model: Any,
    reward_scores: Any,
    num_negatives: int | None,
    negative_seed: int,
) -> Any:
    """The built (untrained) trainer of a baseline method, from its module's builder."""
    rows = data.train_dataset
    out = args.output_dir
    common = dict(tree=tree, tokenizer=tokenizer, train=False, peft_config=peft_config, args=args)
    if method in SFT_METHODS:
        from trl_flower.baselines.sft import train_sft

        ifair = method == "ifair"
        return train_sft(
            method,
            model,
            rows["prompt"],
            rows["item_id"],
            out,
            histories=rows["history_item_title"] if ifair else None,
            target_titles=rows["item_title"] if ifair else None,
            add_special_tokens=data.prompt_mode == "reference",
            **common,
        )
    if method in PREFERENCE_METHODS:
        from trl_flower.baselines.preference import train_preference

        return train_preference(
            method,
            model,
            ref_model,
            rows,
            out,
            num_negatives=num_negatives,
            item_counts=data.counts() if method == "rosepo" else None,  # RosePO's negatives ∝ counts; the rest: uniform
            negative_seed=negative_seed,
            **common,
        )
    from trl_flower.baselines.online_rl import train_online_rl

    if reward_scores is None:
        raise ValueError(
            f"method {method!r} needs reward_scores: the SASRec logits of the training rows [rows, items] "
            "(train_logits.npy of `trl-flower sasrec`; --sasrec_logits on the command line)"
        )
    if isinstance(reward_scores, (str, os.PathLike)):
        reward_scores = np.load(reward_scores, mmap_mode="r")
    return train_online_rl(
        method,
        model,
        ref_model,
        rows.select_columns(["prompt", "row_index"]),
        out,
        preference_scores=reward_scores,
        **common,
    )


def finish_run(
    trainer: Any,
    output_dir: str | os.PathLike | None,
    *,
    tokenizer: Any,
    tree: PrefixTree,
    method: str,
    resume_from_checkpoint: str | bool | None = None,
    dataset_name: str | None = None,
    data: dict[str, Any] | None = None,
) -> Any:
    """Train a built trainer, then save the run: the one place where runs are trained and saved.

    Trains (resuming from `resume_from_checkpoint`, default ``trainer.args.resume_from_checkpoint``; ``"true"``
    means the last checkpoint in ``args.output_dir``). If `output_dir` is given: saves the model (all processes
    take part, as ZeRO-3 gathers the weights), then on the main process the tokenizer and, for the baselines, the
    tree (`FlowerTrainer` writes its tree and record itself), writes the model card, and pushes to the Hub if
    ``args.push_to_hub`` (the Hub copy gets TRL's card with the Flower settings; the local card also has the data
    table).

    Returns:
        ``trainer.train()``'s output (None for PPO).
    """
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else trainer.args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    if method == "ppo":
        if resume:
            raise ValueError(
                "TRL's experimental PPOTrainer cannot resume from a checkpoint; drop resume_from_checkpoint"
            )
        result = trainer.train()
    else:
        if resume and not hasattr(trainer, "flower_record"):  # FlowerTrainer.train checks its checkpoint itself
            path = checkpoint.resume_checkpoint_dir(resume, trainer.args.output_dir)
            checkpoint.check_resume_checkpoint(
                path, world_size=trainer.args.world_size, process_index=trainer.args.process_index
            )
        result = trainer.train(resume_from_checkpoint=resume or None)
    if output_dir is None:
        return result
    trainer.save_model(str(output_dir))
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
        if not hasattr(trainer, "flower_record"):  # FlowerTrainer._save already wrote the tree and its record
            checkpoint.save_run_files(output_dir, tree=tree)
        write_model_card(trainer, output_dir, dataset_name=dataset_name, data={"method": method, **(data or {})})
    return result
