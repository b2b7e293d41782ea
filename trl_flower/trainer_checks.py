"""Construction checks of `FlowerTrainer`: everything that can be wrong before (or right after) the model loads.

Each function checks one argument against the tree and the config and raises with the setting, the rule it breaks
and the fix; the trainer calls them in its ``__init__`` and keeps only the plumbing. No TRL import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree

__all__ = [
    "COMPLETION_COLUMN",
    "check_dataset",
    "check_item_groups",
    "check_item_ids",
    "check_model_and_tree",
    "check_tokenizer",
    "resolve_reward_model",
]

COMPLETION_COLUMN = "completion"  # SFT target text in tokenization_mode="reference" (TRL's prompt-completion name)


def resolve_reward_model(
    tree: PrefixTree, args: Any, reward_model: PrefixTreeRewardModel | None
) -> PrefixTreeRewardModel:
    """The given reward model (checked against the tree and the config) or the one the config describes.

    Args:
        tree: the trainer's prefix tree.
        args: the `FlowerConfig` (reward fields: ``reward_variant``, ``preference_scores_path``,
            ``nonterminal_log_term``, ``row_index_column``, ``title_log_term``, the ``distill_*`` fields).
        reward_model: a `PrefixTreeRewardModel` on `tree`, or None to build one from the config.
    """
    if reward_model is None:
        scores = None
        if args.preference_scores_path is not None:
            scores = np.load(args.preference_scores_path, mmap_mode="r")  # only the batch rows are read
        return PrefixTreeRewardModel(
            tree,
            variant=args.reward_variant,
            preference_scores=scores,
            nonterminal_log_term=args.nonterminal_log_term,
            row_column=args.row_index_column,
            title_log_term=args.title_log_term,
            distill=args.distilled_reward(),
        )
    if not isinstance(reward_model, PrefixTreeRewardModel):
        raise TypeError(
            f"`reward_model` must be a PrefixTreeRewardModel (it provides the token-level targets), got "
            f"{type(reward_model).__name__}"
        )
    if args.reward_variant != "none" or args.preference_scores_path is not None:
        raise ValueError(
            "pass either `reward_model` or the config's reward fields (reward_variant, preference_scores_path), not "
            "both: the config fields only describe the reward model the trainer builds when none is given."
        )
    rt = reward_model.tree
    if (rt.num_nodes, rt.num_items, rt.terminator_id) != (tree.num_nodes, tree.num_items, tree.terminator_id):
        raise ValueError(
            f"`reward_model` is built on another tree ({rt!r}) than the trainer's ({tree!r}); build it with "
            "PrefixTreeRewardModel(tree, ...) on the same tree."
        )
    if reward_model.nonterminal_log_term != args.nonterminal_log_term:
        raise ValueError(
            f"reward_model.nonterminal_log_term={reward_model.nonterminal_log_term} differs from the config's "
            f"nonterminal_log_term={args.nonterminal_log_term}; set them equal."
        )
    if reward_model.title_log_term != args.title_log_term:
        raise ValueError(
            f"reward_model.title_log_term={reward_model.title_log_term!r} differs from the config's "
            f"title_log_term={args.title_log_term!r}; set them equal."
        )
    if reward_model.row_column != args.row_index_column:
        raise ValueError(
            f"reward_model.row_column={reward_model.row_column!r} differs from the config's "
            f"row_index_column={args.row_index_column!r}; set them equal."
        )
    return reward_model


def check_item_groups(item_groups: Sequence[int] | np.ndarray | None, tree: PrefixTree) -> torch.Tensor | None:
    """`item_groups` as a LongTensor [num_items] (popularity group per item id, 0 = most popular), or None."""
    if item_groups is None:
        return None
    groups = torch.as_tensor(np.asarray(item_groups))
    if groups.shape != (tree.num_items,) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(
            f"item_groups must be an integer array with one popularity group per item id, shape ({tree.num_items},); "
            f"got shape {tuple(groups.shape)} and dtype {groups.dtype}."
        )
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("item_groups must be >= 0 (group 0 = most popular); map unknown items to the last group.")
    return groups.long()


def check_dataset(name: str, dataset: Any, args: Any, tree: PrefixTree, reward_model: PrefixTreeRewardModel) -> None:
    """The columns FlowerTrainer reads are present and the target item ids lie in the tree (a dict: each part)."""
    if isinstance(dataset, dict):  # several eval datasets (dict or DatasetDict)
        for key, part in dataset.items():
            check_dataset(f"{name}[{key!r}]", part, args, tree, reward_model)
        return
    if dataset is None or getattr(dataset, "column_names", None) is None:
        return  # no dataset, or a streaming dataset whose columns are unknown until read
    columns = set(dataset.column_names)
    needed = {"prompt": "the prompt", args.item_id_column: "the target item id (FlowerConfig.item_id_column)"}
    if reward_model.variant != "none":
        needed[reward_model.row_column] = f"the preference-score row of reward_variant={reward_model.variant!r}"
    if args.tokenization_mode == "reference":
        needed[COMPLETION_COLUMN] = "the SFT target text of tokenization_mode='reference'"
    for column, what in needed.items():
        if column not in columns:
            raise ValueError(f"{name} has no column {column!r} ({what}); its columns are {sorted(columns)}.")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"{name} has no rows, so there is nothing to train or evaluate on (training would take 0 steps and report "
            "a loss of 0.0). Check the split or the filter that produced it."
        )
    if name == "train_dataset" and hasattr(dataset, "__len__"):
        check_rows_fill_a_batch(len(dataset), args)
    if hasattr(dataset, "__len__") and hasattr(dataset, "with_format"):
        check_item_ids(f"{name}[{args.item_id_column!r}]", dataset.with_format("numpy")[args.item_id_column], tree)


def check_rows_fill_a_batch(num_rows: int, args: Any) -> None:
    """Raise ValueError when the training rows cannot fill one generation batch.

    GRPO's sampler cuts the shuffled rows into generation batches of ``generation_batch_size / num_generations``
    prompts and drops an incomplete one, so with fewer rows no step would ever run (transformers then fails inside
    `train()` asking for ``max_steps``).
    """
    prompts = args.generation_batch_size // args.num_generations
    if num_rows < prompts:
        raise ValueError(
            f"train_dataset has {num_rows} rows, fewer than the {prompts} prompts of one generation batch "
            f"(generation_batch_size={args.generation_batch_size} = per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x steps_per_generation "
            f"{args.steps_per_generation}, over num_generations={args.num_generations}); incomplete batches are "
            "dropped, so no training step would run. Lower per_device_train_batch_size (or steps_per_generation), "
            "or add rows."
        )


def check_item_ids(where: str, item_ids: Any, tree: PrefixTree) -> None:
    """Raise ValueError unless `item_ids` are integers in ``[0, tree.num_items)``; `where` names the column."""
    ids = np.asarray(item_ids)
    column = where.split("[", 1)[-1].rstrip("]")
    if not np.issubdtype(ids.dtype, np.integer):
        example = ids.flat[0].item() if ids.size else None
        raise ValueError(
            f"{where} must hold integer item ids (an index into the prefix tree's {tree.num_items} items), but it "
            f"holds {ids.dtype} values (e.g. {example!r}). Convert the column, e.g. "
            f"dataset.cast_column({column}, datasets.Value('int64')) for ids written as text."
        )
    if ids.size and (ids.min() < 0 or ids.max() >= tree.num_items):
        bad = int(np.flatnonzero((ids < 0) | (ids >= tree.num_items))[0])
        raise ValueError(
            f"{where} must hold integer item ids in [0, {tree.num_items}) (the tree's items); row {bad} holds "
            f"{int(ids[bad])} (range [{int(ids.min())}, {int(ids.max())}]). Build the tree from the catalogue the ids "
            "index."
        )


def check_tokenizer(tokenizer: Any, tree: PrefixTree) -> None:
    """Before the model loads: the tokenizer (`processing_class`) has an EOS token, at which samples end.

    TRL cuts every completion at the tokenizer's EOS (and the model's generation-config EOS ids), so without one the
    sampler has no end token, whatever terminator the tree uses.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if getattr(tokenizer, "eos_token_id", 0) is None:
        raise ValueError(_missing_eos_message(tree))


def _missing_eos_message(tree: PrefixTree) -> str:
    return (
        "the tokenizer has no EOS token (processing_class.eos_token_id is None), so a sampled item could never be "
        "cut at its end (TRL ends completions at the tokenizer's EOS) and sampling would fail inside train(). Set one "
        "before building the trainer and pass that tokenizer as processing_class, e.g. "
        f"tokenizer.eos_token = tokenizer.convert_ids_to_tokens({tree.terminator_id}) (the tree's terminator) in the "
        "default tokenisation, or the model's end-of-turn token."
    )


def check_model_and_tree(args: Any, tree: PrefixTree, vocab_size: int, eos_ids: Sequence[int]) -> int | None:
    """Check the tree against the loaded model and tokenizer; return the token forced after the terminator (or None).

    Args:
        args: the `FlowerConfig` (``max_completion_length``, ``tokenization_mode``).
        tree: the trainer's prefix tree.
        vocab_size: the model's vocabulary size.
        eos_ids: the token ids at which a completion ends (`_trl_compat.completion_eos_ids`).

    Returns:
        None in the default mode (the terminator is an EOS); in ``tokenization_mode="reference"`` the EOS the sampler
        must emit after the tree's own terminator (e.g. "\\n"), or None if the terminator already is an EOS.
    """
    if tree.vocab_bound > vocab_size:
        raise ValueError(
            f"the prefix tree uses token ids up to {tree.vocab_bound - 1} but the model's vocabulary has "
            f"{vocab_size} entries; build the tree with this model's tokenizer (PrefixTree.from_titles(titles, tok))."
        )
    longest = int(tree.item_length.max())
    if args.max_completion_length is not None and args.max_completion_length < longest:
        raise ValueError(
            f"max_completion_length={args.max_completion_length} is shorter than the longest item path "
            f"({longest} tokens with the terminator), so some samples would be cut before their item ends. Set "
            f"max_completion_length >= {longest}."
        )
    eos_ids = list(eos_ids)
    if not eos_ids or any(e is None for e in eos_ids):
        raise ValueError(_missing_eos_message(tree))
    terminator = tree.terminator_id
    if args.tokenization_mode == "default":
        if terminator not in eos_ids:
            raise ValueError(
                f"tokenization_mode='default' needs item paths that end with an EOS token (one of {eos_ids}) so "
                "that sampling stops at the end of an item and the SFT target equals the tree path, but the "
                f"tree's terminator is {terminator}. Build the tree with terminator_id=tokenizer.eos_token_id, "
                "or use tokenization_mode='reference' with a `completion` column."
            )
        return None
    # reference mode: after the tree's terminator (e.g. "\n") the sampler emits EOS, which ends generation
    return None if terminator in eos_ids else eos_ids[0]
