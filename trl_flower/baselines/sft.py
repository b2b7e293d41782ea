r"""BIGRec (SFT) and IFairLRS on TRL's ``SFTTrainer``, with the Flower prompts and the prefix tree's item paths.

**BIGRec** (Bao et al., "A Bi-Step Grounding Paradigm for Large Language Models in Recommendation Systems", 2023;
the Flower repo's ``train_sft.py``): supervised fine-tuning on (prompt, target item) pairs, loss on the response
only. Each row is pre-tokenised here: ``input_ids`` = prompt tokens + the target's token path *exactly as the prefix
tree has it* (title tokens, then the terminator, the tokenizer's EOS by default), ``completion_mask`` = 1 on the path.
``SFTTrainer`` (``completion_only_loss=True``) turns that into labels, so the model is trained on the very sequences
that trie-constrained decoding scores, and the loss is TRL's token mean over the response tokens.

**IFairLRS** (Jiang et al., "Item-side Fairness of Large Language Model-based Recommendation System", WWW 2024;
``item_side_reweight.py``): the same data, each row weighted by its target's popularity group g,

    w_g = q_g / t_g,    q_g = share of group g among training *history* interactions (the popularity shares),
                        t_g = share of group g among training *target* interactions,

and the loss is the batch mean of w_u · (Σ_{response tokens} CE) / (number of response tokens of row u)
(:func:`weighted_response_nll`). Groups are the 8 popularity groups of the training histories
(:func:`~trl_flower.data.popularity_from_histories`); a target title in no history belongs to the least popular
group, for t_g and for its weight.

NOTE: the official ``item_side_reweight.py`` divides each row's CE sum by the *padded* sequence length (prompt and
padding positions included), so a row's weight also depends on its prompt length and on the longest row of its batch.
We divide by the response length, the paper's per-sample loss.

NOTE: the official code gives targets outside every group the weight w_7 but counts only in-group targets in t_g;
here such targets count in t_7 as well, so every weight in use is finite (t_g > 0 whenever a row needs w_g).

Entry point: :func:`train_sft` (``method in {"sft", "ifair"}``); the building blocks are :func:`build_sft_dataset`,
:func:`ifair_group_weights`, :func:`ifair_sample_weights`, :func:`weighted_response_nll` and
:class:`IFairSFTTrainer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from trl import SFTTrainer

from trl_flower.tree import PrefixTree

__all__ = [
    "METHODS",
    "OFFICIAL_SFT_ARGS",
    "IFairSFTTrainer",
    "build_sft_dataset",
    "ifair_group_weights",
    "ifair_sample_weights",
    "official_sft_args",
    "train_sft",
    "weighted_response_nll",
]

METHODS = ("sft", "ifair")
OFFICIAL_SFT_ARGS = dict(learning_rate=3e-4, num_train_epochs=7)
"""Official BIGRec / IFairLRS settings where they do not depend on the hardware (lr 3e-4, 7 epochs); the official
effective batch is 256 (BIGRec) or 128 (IFairLRS): set ``per_device_train_batch_size`` × ``gradient_accumulation_steps``
accordingly."""
WEIGHT_COLUMN = "weight"


# ============================================================================================== IFairLRS weights


def ifair_group_weights(history_shares: Sequence[float], target_groups: Sequence[int]) -> np.ndarray:
    """w_g = q_g / t_g for every group g.

    Args:
        history_shares: q [G], the interaction share of each group in the training histories (``PopularityGroups
            .shares``).
        target_groups: the group of every training row's target (``PopularityGroups.group_of``).

    Returns:
        float64 [G]; a group that no target belongs to (t_g = 0) gets 0 (no row uses that weight).

    Example:
        >>> ifair_group_weights([0.5, 0.3, 0.2], [0, 0, 0, 1])  # t = [0.75, 0.25, 0]
        array([0.66666667, 1.2       , 0.        ])
    """
    q = np.asarray(history_shares, dtype=np.float64)  # [G]
    groups = np.asarray(target_groups, dtype=np.int64)  # [U]
    if groups.size == 0:
        raise ValueError("no training targets: IFairLRS weights need at least one row")
    if groups.min() < 0 or groups.max() >= q.size:
        raise ValueError(f"target groups must lie in [0, {q.size}), got {groups.min()}..{groups.max()}")
    t = np.bincount(groups, minlength=q.size) / groups.size  # [G]
    return np.divide(q, t, out=np.zeros_like(q), where=t > 0)


def ifair_sample_weights(histories: Sequence[Sequence[str]], target_titles: Sequence[str], num_groups: int = 8):
    """Per-row IFairLRS weights of training rows: w of each row's target group (groups from `histories`).

    Args:
        histories: training history titles per row (``train["history_item_title"]``).
        target_titles: training target title per row (``train["item_title"]``).
        num_groups: G (paper: 8).

    Returns:
        (weights float64 [U], group weights float64 [G], target groups int64 [U]).
    """
    from trl_flower.data import popularity_from_histories

    popularity = popularity_from_histories(histories, num_groups)
    groups = np.array([popularity.group_of(t) for t in target_titles], dtype=np.int64)  # [U]
    group_weights = ifair_group_weights(popularity.shares, groups)  # [G]
    return group_weights[groups], group_weights, groups


# ============================================================================================== dataset and loss


def build_sft_dataset(
    prompts: Sequence[str],
    item_ids: Sequence[int],
    tree: PrefixTree,
    tokenizer,
    weights: Sequence[float] | None = None,
    add_special_tokens: bool = True,
):
    """A pre-tokenised prompt-completion dataset for ``SFTTrainer``: the completion is the item's tree path.

    Args:
        prompts: rendered prompts (chat template applied if any), one per row.
        item_ids: the target item id of each row (index into the tree's items).
        tree: the catalogue's prefix tree over `tokenizer`'s tokens.
        tokenizer: tokenises the prompts.
        weights: optional per-row weights (IFairLRS), stored in a ``weight`` column.
        add_special_tokens: passed to the tokenizer for the prompts (as ``trl-flower evaluate`` does: True for
            reference prompts, False for chat-rendered ones).

    Returns:
        ``datasets.Dataset`` with ``input_ids`` (prompt + path), ``completion_mask`` (1 on the path) and ``weight``.
    """
    from datasets import Dataset

    if len(prompts) != len(item_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(item_ids)} item ids; give one target per prompt")
    items = torch.as_tensor(np.asarray(item_ids, dtype=np.int64))
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= tree.num_items):
        raise ValueError(f"item ids must lie in [0, {tree.num_items}) (the tree's items)")
    paths, lengths = tree.item_paths(items)  # [U, L], [U]
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    columns: dict[str, list] = {"input_ids": [], "completion_mask": []}
    for p, path, n in zip(prompt_ids, paths.tolist(), lengths.tolist()):
        columns["input_ids"].append(p + path[:n])
        columns["completion_mask"].append([0] * len(p) + [1] * n)
    if weights is not None:
        if len(weights) != len(prompts):
            raise ValueError(f"{len(weights)} weights for {len(prompts)} rows")
        columns[WEIGHT_COLUMN] = [float(w) for w in weights]
    return Dataset.from_dict(columns)


def weighted_response_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""IFairLRS loss: (1/B) Σ_u w_u · (Σ_{t ∈ response(u)} −log p(y_t | y_<t)) / |response(u)|.

    Args:
        logits: [B, T, V] next-token logits (position t predicts token t + 1).
        labels: [B, T] token ids, −100 outside the response (prompt, padding).
        weights: [B] per-row weights.

    Returns:
        Scalar loss (float32 math on the response positions only).
    """
    target = labels[:, 1:]  # [B, T-1]
    mask = target != -100  # [B, T-1]
    logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # [E, V] response positions only
    nll = torch.zeros(mask.shape, dtype=logp.dtype, device=logits.device)  # [B, T-1]
    nll[mask] = -logp.gather(1, target[mask].unsqueeze(1)).squeeze(1)
    per_row = nll.sum(1) / mask.sum(1).clamp(min=1)  # [B] mean CE over each row's response
    return (weights.to(per_row.dtype) * per_row).mean()


class _WeightCollator:
    """TRL's collator plus the ``weight`` column as a [B] float tensor."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: v for k, v in e.items() if k != WEIGHT_COLUMN} for e in examples])
        batch[WEIGHT_COLUMN] = torch.tensor([e[WEIGHT_COLUMN] for e in examples], dtype=torch.float32)
        return batch


class IFairSFTTrainer(SFTTrainer):
    r"""[`SFTTrainer`] with the IFairLRS per-sample weighted loss.

    The only change w.r.t. [`SFTTrainer`] is `compute_loss`: it returns :func:`weighted_response_nll` of the batch,
    with each row's weight from the dataset's ``weight`` column (see :func:`build_sft_dataset`), instead of the token
    mean. The weight column is kept through column removal and collation. The loss is a per-micro-batch mean, so
    transformers divides it by the gradient accumulation steps (``loss_is_scaled_for_ga = False``).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _WeightCollator(self.data_collator)
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if dataset is not None and WEIGHT_COLUMN not in dataset.column_names:
                raise ValueError(
                    f"IFairSFTTrainer needs a `{WEIGHT_COLUMN}` column in {name} (build_sft_dataset "
                    "with weights=ifair_sample_weights(...)[0])"
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHT_COLUMN)  # [B]
        labels = inputs.pop("labels")  # [B, T]
        outputs = model(**inputs, use_cache=False)
        loss = weighted_response_nll(outputs.logits, labels, weights)
        return (loss, outputs) if return_outputs else loss


# ============================================================================================== entry point


def train_sft(
    method: str,
    model_path: str | os.PathLike,
    prompts: Sequence[str],
    item_ids: Sequence[int],
    output_dir: str | os.PathLike,
    *,
    tree: PrefixTree,
    tokenizer=None,
    histories: Sequence[Sequence[str]] | None = None,
    target_titles: Sequence[str] | None = None,
    add_special_tokens: bool = True,
    train: bool = True,
    save: bool = True,
    peft_config: Any = None,
    args: Any = None,
    **config_kwargs: Any,
):
    """Train BIGRec (``method="sft"``) or IFairLRS (``method="ifair"``) with TRL's ``SFTTrainer``.

    Args:
        method: ``"sft"`` or ``"ifair"``.
        model_path: the base model directory.
        prompts, item_ids: training prompts and their target item ids.
        output_dir: where the model, tokenizer, prefix tree and model card are saved.
        tree: the catalogue's prefix tree over the model's tokenizer.
        tokenizer: default loaded from `model_path`.
        histories, target_titles: training history titles and target titles per row (IFairLRS weights; required
            for ``"ifair"``).
        add_special_tokens: tokenizer flag for the prompts (see :func:`build_sft_dataset`).
        train, save: run training; save the run after it (`trl_flower.run.finish_run`: model, tokenizer, tree, card).
        peft_config: e.g. ``peft.LoraConfig(...)``, passed to ``SFTTrainer`` (only the adapter is trained and saved).
        args: a ready ``SFTConfig`` (then `config_kwargs` must be empty); it must keep ``completion_only_loss``.
        **config_kwargs: ``SFTConfig`` fields (defaults :data:`OFFICIAL_SFT_ARGS`, ``completion_only_loss=True``).

    Returns:
        The trainer (``SFTTrainer`` or :class:`IFairSFTTrainer`).
    """
    from transformers import AutoTokenizer
    from trl import SFTConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if args is not None and config_kwargs:
        raise ValueError(f"pass either args= or config keyword arguments, not both (got {sorted(config_kwargs)})")
    weights = None
    if method == "ifair":
        if histories is None or target_titles is None:
            raise ValueError("method='ifair' needs histories= and target_titles= (training rows) for the weights")
        weights = ifair_sample_weights(histories, target_titles)[0]
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = build_sft_dataset(
        prompts, item_ids, tree, tokenizer, weights=weights, add_special_tokens=add_special_tokens
    )
    if args is None:
        args = SFTConfig(output_dir=str(output_dir), **{**official_sft_args(), **config_kwargs})
    if args.completion_only_loss is not True:
        raise ValueError(
            f"SFTConfig.completion_only_loss={args.completion_only_loss}: BIGRec's loss is on the response (the item's "
            "tree path) only, and the pre-tokenised rows mark it with a completion mask; set completion_only_loss=True."
        )
    cls = IFairSFTTrainer if method == "ifair" else SFTTrainer
    trainer = cls(
        model=str(model_path), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    if train:
        from trl_flower.run import finish_run

        finish_run(trainer, output_dir if save else None, tokenizer=tokenizer, tree=tree, method=method)
    return trainer


def official_sft_args() -> dict[str, Any]:
    """The SFTConfig settings of the official BIGRec/IFairLRS runs (:data:`OFFICIAL_SFT_ARGS`), loss on the response."""
    return {**OFFICIAL_SFT_ARGS, "completion_only_loss": True}
