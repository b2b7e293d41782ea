r"""The recommendation DPO family (DPO, S-DPO, DMPO, RosePO): offline preference tuning from catalogue negatives.

Paper definitions as implemented by the Flower authors' code (flower_reference.md §4). With the implicit reward
r(y) = log π_θ(y|x) − log π_ref(y|x) (sequence log-probs summed over the item's token path, terminator included),
y_w the target item and y_1 … y_J sampled negatives::

    DPO     L = −log σ( β (r(y_w) − r(y_1)) )                             1 negative, uniform over the catalogue
    S-DPO   L = −log σ( −log Σ_j exp( β (r(y_j) − r(y_w)) ) )             J = 3 negatives, uniform
    DMPO    L = −log σ( β Σ_j (r(y_w) − r(y_j)) )                         J = 3 negatives, uniform; a SUM over j
    RosePO  L = −log σ( β (r(y_w) − r(y_1)) )                             1 negative ∝ its count in training histories

"Uniform" is uniform over item ids whose title differs from the target's (every id sharing the target's title is
excluded; negatives of one row have distinct titles). RosePO's weights are the items' occurrence counts in the
training histories (items that never occur get weight 0), again excluding the target's title.

Everything goes through TRL's ``DPOTrainer``:

* DPO and RosePO use TRL's own sigmoid loss unchanged (:class:`PreferenceDPOTrainer` only accepts our pre-tokenised
  rows, whose completions are exactly the items' token paths in the prefix tree, so DPO scores the same sequences
  Flower samples and evaluation decodes).
* S-DPO and DMPO use :class:`MultiNegativeDPOTrainer`, which overrides the one hook that computes the loss,
  ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` (present with that signature in trl 1.12 and 1.16), and
  a collator that stacks the chosen and the J rejected sequences of each row. The loss functions themselves are the
  pure tensor functions :func:`sdpo_loss` and :func:`dmpo_loss`.

Entry point: :func:`train_preference` (``method in {"dpo", "sdpo", "dmpo", "rosepo"}``); it takes a Flower or an SFT
checkpoint as policy init and any checkpoint (default: the policy init) as reference. The online RL baselines
(RLOO, GRPO, PPO with the SASRec reward) are in `trl_flower.baselines.online_rl`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from trl import DPOTrainer

from trl_flower import checkpoint
from trl_flower.tree import PrefixTree

__all__ = [
    "METHODS",
    "NUM_NEGATIVES",
    "OFFICIAL_DPO_ARGS",
    "MultiNegativeCollator",
    "MultiNegativeDPOTrainer",
    "PreferenceDPOTrainer",
    "build_preference_dataset",
    "dmpo_loss",
    "dpo_sigmoid_loss",
    "make_preference_dataset",
    "official_dpo_args",
    "sample_popularity_negatives",
    "sample_uniform_negatives",
    "sdpo_loss",
    "title_ids",
    "train_preference",
]

METHODS = ("dpo", "sdpo", "dmpo", "rosepo")
NUM_NEGATIVES = {"dpo": 1, "sdpo": 3, "dmpo": 3, "rosepo": 1}
"""Negatives per row of each method (official scripts)."""
OFFICIAL_DPO_ARGS = dict(beta=0.3, learning_rate=1e-6, num_train_epochs=1, per_device_train_batch_size=1)
"""Official hyper-parameters of the DPO family (lr 1e-6, 1 epoch, batch 1, β = 0.3); used unless overridden."""


# ============================================================================================== losses


def dpo_sigmoid_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row sigmoid DPO loss −log σ(β (r_w − r_l)) [B] (TRL's ``loss_type="sigmoid"``; DPO and RosePO)."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def sdpo_loss(chosen_logratio: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row S-DPO loss −log σ(−log Σ_j exp(β (r_j − r_w))) [B].

    Args:
        chosen_logratio: [B] r(y_w) = log π_θ(y_w|x) − log π_ref(y_w|x).
        rejected_logratios: [B, J] r(y_j) of the J negatives.
        beta: β.

    With J = 1 this is the sigmoid DPO loss. Computed stably with ``logsumexp``.
    """
    _check_shapes(chosen_logratio, rejected_logratios)
    return -F.logsigmoid(-torch.logsumexp(beta * (rejected_logratios - chosen_logratio.unsqueeze(1)), dim=1))


def dmpo_loss(chosen_logratio: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row DMPO loss −log σ(β Σ_j (r_w − r_j)) [B] (a sum over the J negatives, as in the official code).

    Args:
        chosen_logratio: [B] r(y_w).
        rejected_logratios: [B, J] r(y_j).
        beta: β.
    """
    _check_shapes(chosen_logratio, rejected_logratios)
    return -F.logsigmoid(beta * (chosen_logratio.unsqueeze(1) - rejected_logratios).sum(dim=1))


MULTI_NEGATIVE_LOSSES = {"sdpo": sdpo_loss, "dmpo": dmpo_loss}


def _check_shapes(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or rejected.dim() != 2 or rejected.shape[0] != chosen.shape[0]:
        raise ValueError(
            f"expected chosen_logratio [B] and rejected_logratios [B, J], got {tuple(chosen.shape)} and "
            f"{tuple(rejected.shape)}"
        )


# ============================================================================================== negative sampling


def title_ids(tree: PrefixTree) -> np.ndarray:
    """A title id per item id [num_items]: items with the same token path (same title) share it (= terminal node)."""
    return np.asarray(tree.item_node, dtype=np.int64)


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _rejection_sample(targets, titles, num_negatives, draw, allowed_titles_per_row) -> torch.Tensor:
    """Redraw entries that hit the target's title or an earlier negative's title until none does (vectorised)."""
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)  # [B]
    titles = torch.as_tensor(np.asarray(titles), dtype=torch.long)  # [M]
    B, J = targets.shape[0], int(num_negatives)
    if J < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if B and (targets.min() < 0 or targets.max() >= titles.shape[0]):
        raise ValueError(f"target item ids must lie in [0, {titles.shape[0]})")
    short = allowed_titles_per_row(targets) < J  # [B]
    if short.any():
        b = int(short.nonzero()[0])
        raise ValueError(
            f"row {b} (target item {int(targets[b])}) has fewer than {J} other titles to sample negatives from"
        )
    out = torch.empty(B, J, dtype=torch.long)
    target_title = titles[targets]  # [B]
    for j in range(J):
        taken = torch.cat([target_title.unsqueeze(1), titles[out[:, :j]]], dim=1)  # [B, 1 + j] titles to avoid
        todo = torch.arange(B)
        while todo.numel():
            cand = draw(todo.numel())  # [n]
            ok = ~(titles[cand].unsqueeze(1) == taken[todo]).any(dim=1)  # [n]
            out[todo[ok], j] = cand[ok]
            todo = todo[~ok]
    return out


def sample_uniform_negatives(
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    titles: Sequence[int] | np.ndarray | torch.Tensor,
    num_negatives: int = 3,
    seed: int | torch.Generator | None = 0,
) -> torch.Tensor:
    """Negatives drawn uniformly over item ids whose title differs from the target's (S-DPO, DMPO, DPO).

    Args:
        targets: [B] target item ids.
        titles: [num_items] a title id per item (:func:`title_ids`); all ids sharing the target's title are excluded.
        num_negatives: J per row; the J negatives of a row have distinct titles.
        seed: an int seed or a ``torch.Generator`` (same seed ⇒ same negatives).

    Returns:
        LongTensor [B, J] of item ids. Rejection sampling: each entry is uniform over the allowed ids.
    """
    titles_t = torch.as_tensor(np.asarray(titles), dtype=torch.long)
    M = titles_t.shape[0]
    g = _generator(seed)
    num_titles = int(torch.unique(titles_t).numel())
    return _rejection_sample(
        targets,
        titles_t,
        num_negatives,
        lambda n: torch.randint(M, (n,), generator=g),
        lambda t: torch.full_like(t, num_titles - 1),
    )


def sample_popularity_negatives(
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    titles: Sequence[int] | np.ndarray | torch.Tensor,
    counts: Sequence[float] | np.ndarray | torch.Tensor,
    num_negatives: int = 1,
    seed: int | torch.Generator | None = 0,
) -> torch.Tensor:
    """RosePO negatives: item i drawn ∝ counts[i] (its occurrences in training histories), target's title excluded.

    Items with count 0 are never drawn. Sampling an item ∝ its count samples a title ∝ the title's total count, which
    is the official per-title weighting.

    Args:
        targets: [B] target item ids.
        titles: [num_items] title id per item (:func:`title_ids`).
        counts: [num_items] non-negative weights (``trl_flower.data.popularity.history_item_counts``).
        num_negatives: J per row (official RosePO: 1); distinct titles within a row.
        seed: int seed or ``torch.Generator``.

    Returns:
        LongTensor [B, J] of item ids.
    """
    titles_t = torch.as_tensor(np.asarray(titles), dtype=torch.long)
    w = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    if w.shape != titles_t.shape or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"counts must be finite, >= 0 and one per item ({titles_t.shape[0]}), got shape {tuple(w.shape)}"
        )
    g = _generator(seed)
    positive_titles = torch.zeros(int(titles_t.max()) + 1, dtype=torch.bool)
    positive_titles[titles_t[w > 0]] = True
    n_pos = int(positive_titles.sum())

    def allowed(t):  # titles with positive weight other than the target's
        return n_pos - positive_titles[titles_t[t]].long()

    return _rejection_sample(
        targets, titles_t, num_negatives, lambda n: torch.multinomial(w, n, replacement=True, generator=g), allowed
    )


# ============================================================================================== datasets


def _item_token_paths(tree: PrefixTree, items: torch.Tensor) -> list[list[int]]:
    ids, lengths = tree.item_paths(items.reshape(-1))
    return [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]


def build_preference_dataset(
    prompts: Sequence[str],
    targets: Sequence[int] | torch.Tensor,
    negatives: torch.Tensor | np.ndarray,
    tree: PrefixTree,
    tokenizer,
    multi_negative: bool | None = None,
):
    """Pre-tokenised preference rows for :class:`PreferenceDPOTrainer` / :class:`MultiNegativeDPOTrainer`.

    The prompt is tokenised like GRPO/Flower tokenise string prompts (``tokenizer(text=prompt)``); chosen and
    rejected are exactly the items' token paths read back from the tree (title tokens + terminator), so no
    tokenisation across the prompt/completion boundary can change them.

    Args:
        prompts: [B] prompt strings (e.g. ``PromptBuilder`` output; chat mode already renders the template).
        targets: [B] target item ids.
        negatives: [B, J] negative item ids.
        tree: the catalogue's prefix tree (built with this tokenizer).
        tokenizer: the policy's tokenizer.
        multi_negative: ``rejected_ids`` as a list of J paths per row (S-DPO/DMPO); default ``J > 1``. With
            ``False`` J must be 1 and ``rejected_ids`` is one path (TRL's format).

    Returns:
        ``datasets.Dataset`` with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``chosen_item_id``,
        ``rejected_item_ids``.
    """
    from datasets import Dataset

    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    negatives = torch.as_tensor(np.asarray(negatives), dtype=torch.long)
    if negatives.dim() == 1:
        negatives = negatives.unsqueeze(1)
    B, J = negatives.shape
    if len(prompts) != B or targets.shape[0] != B:
        raise ValueError(f"got {len(prompts)} prompts, {targets.shape[0]} targets and {B} rows of negatives")
    multi = J > 1 if multi_negative is None else bool(multi_negative)
    if not multi and J != 1:
        raise ValueError(f"single-negative rows need J = 1, got J = {J}")
    prompt_ids = tokenizer(text=list(prompts))["input_ids"]
    chosen = _item_token_paths(tree, targets)
    rejected = _item_token_paths(tree, negatives)  # row-major: row b's J paths are consecutive
    rejected = [rejected[b * J : (b + 1) * J] for b in range(B)]
    return Dataset.from_dict(
        {
            "prompt_ids": [list(p) for p in prompt_ids],
            "chosen_ids": chosen,
            "rejected_ids": rejected if multi else [r[0] for r in rejected],
            "chosen_item_id": targets.tolist(),
            "rejected_item_ids": negatives.tolist(),
        }
    )


def make_preference_dataset(
    method: str,
    dataset,
    tree: PrefixTree,
    tokenizer,
    *,
    num_negatives: int | None = None,
    item_counts: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
    prompt_column: str = "prompt",
    item_column: str = "item_id",
    history_column: str = "history_item_id",
):
    """Sample negatives for `method` and build the pre-tokenised preference dataset.

    Args:
        method: ``"dpo"``, ``"sdpo"``, ``"dmpo"`` or ``"rosepo"``.
        dataset: a ``datasets.Dataset`` with a prompt column and a target item column (``load_amazon`` splits plus
            ``PromptBuilder.add_prompts``); RosePO also reads `history_column` unless `item_counts` is given.
        tree: the catalogue's prefix tree (item id = tree item id).
        tokenizer: the policy's tokenizer.
        num_negatives: default :data:`NUM_NEGATIVES` [method].
        item_counts: RosePO weights per item; default: counts in this dataset's histories.
        seed: negative-sampling seed.
    """
    method = _check_method(method)
    J = NUM_NEGATIVES[method] if num_negatives is None else int(num_negatives)
    targets = np.asarray(dataset[item_column], dtype=np.int64)
    titles = title_ids(tree)
    if method == "rosepo":
        if item_counts is None:
            from trl_flower.data.popularity import history_item_counts

            item_counts = history_item_counts(dataset[history_column], tree.num_items)
        negatives = sample_popularity_negatives(targets, titles, item_counts, J, seed)
    else:
        negatives = sample_uniform_negatives(targets, titles, J, seed)
    multi = method in MULTI_NEGATIVE_LOSSES
    return build_preference_dataset(dataset[prompt_column], targets, negatives, tree, tokenizer, multi_negative=multi)


def _check_method(method: str) -> str:
    m = str(method).lower()
    if m not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return m


# ============================================================================================== trainers


def _require_pretokenised(dataset, name: str):
    cols = getattr(dataset, "column_names", None) or list(next(iter(dataset)).keys())
    missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(cols)
    if missing:
        raise ValueError(
            f"the {name} dataset must be pre-tokenised with item token paths (columns prompt_ids, chosen_ids, "
            f"rejected_ids; missing {sorted(missing)}); build it with make_preference_dataset / "
            "build_preference_dataset"
        )
    return dataset


class PreferenceDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` on rows whose completions are item token paths (DPO, RosePO; base of S-DPO/DMPO).

    The only change: ``_prepare_dataset`` passes our pre-tokenised rows through instead of re-tokenising
    ``prompt + chosen`` text, which could merge tokens across the boundary and leave the tree. The loss, reference
    handling, logging and everything else are TRL's.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = _require_pretokenised(dataset, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
        return dataset


@dataclass
class MultiNegativeCollator:
    """Collates rows with J rejected paths into one right-padded batch of (1 + J)·B sequences.

    Order: all chosen sequences, then the first negative of every row, then the second, … (so
    ``logps.view(1 + J, B)`` gives chosen in row 0 and negative j in row j + 1). Sequences longer than `max_length`
    keep their start.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` [(1+J)B, T] and ``num_negatives`` (J, an int).
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        J = len(examples[0]["rejected_ids"])
        if any(len(ex["rejected_ids"]) != J for ex in examples):
            raise ValueError("every row of a batch needs the same number of negatives")
        completions = [ex["chosen_ids"] for ex in examples]
        for j in range(J):
            completions += [ex["rejected_ids"][j] for ex in examples]
        prompts = [ex["prompt_ids"] for ex in examples] * (1 + J)
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
        if self.max_length is not None:
            seqs, masks = [s[: self.max_length] for s in seqs], [m[: self.max_length] for m in masks]
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), T), dtype=torch.long)
        completion = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            completion[i, : len(m)] = torch.tensor(m)
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion, "num_negatives": J}


class MultiNegativeDPOTrainer(PreferenceDPOTrainer):
    """``DPOTrainer`` with a multi-negative loss: S-DPO (softmax over negatives) or DMPO (summed margins).

    Overrides ``_compute_loss`` only (the loss hook shared by trl 1.12 and 1.16); it scores the (1 + J)·B sequences of
    :class:`MultiNegativeCollator` with the policy and the frozen reference, forms r(y) = log π_θ − log π_ref (sums
    over completion tokens) and applies :func:`sdpo_loss` or :func:`dmpo_loss`, averaged over the batch.

    Args:
        loss: ``"sdpo"`` or ``"dmpo"``.
        *args, **kwargs: ``DPOTrainer``'s (``ref_model`` should be given explicitly, e.g.
            ``trl_flower.chain.load_reference_policy(flower_dir)``).

    Not supported (clear errors): ``precompute_ref_log_probs``, ``ld_alpha``, a PEFT policy without ``ref_model``,
    and f-divergences other than reverse KL; they change DPOTrainer's two-sequence code paths.
    """

    def __init__(self, *args, loss: str = "sdpo", **kwargs):
        if loss not in MULTI_NEGATIVE_LOSSES:
            raise ValueError(f"loss must be one of {tuple(MULTI_NEGATIVE_LOSSES)}, got {loss!r}")
        self.multi_negative_loss = loss
        config = kwargs.get("args")
        if config is not None:
            if getattr(config, "precompute_ref_log_probs", False):
                raise ValueError("MultiNegativeDPOTrainer does not support precompute_ref_log_probs=True")
            if getattr(config, "ld_alpha", None) is not None:
                raise ValueError("MultiNegativeDPOTrainer does not support ld_alpha")
            if getattr(config, "f_divergence_type", "reverse_kl") not in ("reverse_kl", "FDivergenceType.REVERSE_KL"):
                raise ValueError("MultiNegativeDPOTrainer supports only f_divergence_type='reverse_kl'")
        if kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class")
            if tok is None:
                raise ValueError("pass processing_class (the tokenizer) to MultiNegativeDPOTrainer")
            kwargs["data_collator"] = MultiNegativeCollator(
                tok.pad_token_id, getattr(config, "max_length", None) if config is not None else None
            )
        super().__init__(*args, **kwargs)

    def _sequence_logps(self, model, inputs) -> torch.Tensor:
        """Σ over completion tokens of log π(token) for every sequence [(1+J)B]."""
        from trl.trainer.utils import selective_log_softmax

        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        per_token = selective_log_softmax(logits[:, :-1, :], inputs["input_ids"][:, 1:])  # [N, T-1]
        mask = inputs["completion_mask"][:, 1:].to(per_token.dtype)
        return (per_token * mask).sum(dim=1)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        J = int(inputs["num_negatives"])
        logps = self._sequence_logps(model, inputs)  # [(1+J)B]
        with torch.no_grad():
            if self.ref_model is None:
                raise ValueError(
                    "MultiNegativeDPOTrainer needs an explicit ref_model (e.g. load_reference_policy(checkpoint))"
                )
            ref_logps = self._sequence_logps(self.ref_model, inputs)
        ratios = (logps - ref_logps).view(1 + J, -1)  # [1+J, B]
        chosen, rejected = ratios[0], ratios[1:].T  # [B], [B, J]
        loss = MULTI_NEGATIVE_LOSSES[self.multi_negative_loss](chosen, rejected, self.beta).mean()

        gather = self.accelerator.gather_for_metrics
        chosen_r, rejected_r = (self.beta * chosen).detach(), (self.beta * rejected).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_r).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_r.mean(1)).mean().item())
        metrics["rewards/margins"].append(gather(chosen_r - rejected_r.max(1).values).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_r.unsqueeze(1) > rejected_r).all(1).float()).mean().item())
        return (loss, {}) if return_outputs else loss


# ============================================================================================== entry points


def train_preference(
    method: str,
    model_path: str | os.PathLike,
    ref_path: str | os.PathLike | None,
    dataset,
    output_dir: str | os.PathLike,
    *,
    tree: PrefixTree | str | os.PathLike | None = None,
    titles: Sequence[str] | None = None,
    tokenizer=None,
    num_negatives: int | None = None,
    item_counts: Sequence[float] | np.ndarray | None = None,
    negative_seed: int = 0,
    train: bool = True,
    save: bool = True,
    peft_config: Any = None,
    args: Any = None,
    **config_kwargs: Any,
):
    """Train a DPO-family baseline (DPO, S-DPO, DMPO or RosePO) with TRL's ``DPOTrainer``.

    Args:
        method: ``"dpo"`` (1 uniform negative, sigmoid loss), ``"sdpo"`` (3 uniform negatives, softmax loss),
            ``"dmpo"`` (3 uniform negatives, summed margins) or ``"rosepo"`` (1 popularity-sampled negative,
            sigmoid loss).
        model_path: policy init, a Flower or an SFT (BIGRec) checkpoint directory.
        ref_path: the frozen reference policy; ``None`` = `model_path` (the paper's F_* / B_* setups use the policy
            init as reference).
        dataset: a ``datasets.Dataset`` with ``prompt`` and ``item_id`` columns (and ``history_item_id`` for RosePO),
            negatives are sampled here; or an already built preference dataset (``prompt_ids`` column, from
            :func:`make_preference_dataset`), used as is.
        output_dir: where the trained policy (plus tokenizer, prefix tree and model card) is saved.
        tree: the prefix tree (object or ``.npz`` path); default `titles`, else the tree saved in the model or
            reference directory.
        titles: item titles (item id = index) to build the tree from, with the policy's tokenizer.
        tokenizer: default loaded from `model_path`.
        num_negatives: override :data:`NUM_NEGATIVES`.
        item_counts: RosePO's per-item weights (default: history counts of `dataset`).
        negative_seed: seed of the negative sampler.
        train: run ``trainer.train()``; ``False`` returns the built trainer.
        save: save the run to `output_dir` after training (`trl_flower.run.finish_run`: model, tokenizer, tree, card).
        peft_config: e.g. ``peft.LoraConfig(...)``, passed to ``DPOTrainer`` (the reference stays the separately
            loaded `ref_path` / `model_path` model).
        args: a ready ``DPOConfig`` (then `config_kwargs` must be empty).
        **config_kwargs: ``DPOConfig`` fields (defaults: :data:`OFFICIAL_DPO_ARGS`, and the sigmoid loss for DPO and
            RosePO; e.g. ``max_steps``, ``bf16``).

    Returns:
        The ``DPOTrainer`` (a :class:`PreferenceDPOTrainer` or :class:`MultiNegativeDPOTrainer`).
    """
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from trl_flower.chain import load_reference_policy

    method = _check_method(method)
    if args is not None and config_kwargs:
        raise ValueError(f"pass either args= or config keyword arguments, not both (got {sorted(config_kwargs)})")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    tree = checkpoint.resolve_tree(tree, titles=titles, tokenizer=tokenizer, model_dirs=(model_path, ref_path))
    columns = getattr(dataset, "column_names", [])
    if "prompt_ids" not in columns:
        dataset = make_preference_dataset(
            method, dataset, tree, tokenizer, num_negatives=num_negatives, item_counts=item_counts, seed=negative_seed
        )
    if args is None:
        args = DPOConfig(output_dir=str(output_dir), **{**official_dpo_args(method), **config_kwargs})
    ref = load_reference_policy(ref_path if ref_path is not None else model_path)
    common = dict(
        model=str(model_path),
        ref_model=ref,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if method in MULTI_NEGATIVE_LOSSES:
        trainer = MultiNegativeDPOTrainer(loss=method, **common)
    else:
        trainer = PreferenceDPOTrainer(**common)
    if train:
        from trl_flower.run import finish_run

        finish_run(trainer, output_dir if save else None, tokenizer=tokenizer, tree=tree, method=method)
    return trainer


def official_dpo_args(method: str) -> dict[str, Any]:
    """The official DPOConfig settings of `method` (:data:`OFFICIAL_DPO_ARGS`; the sigmoid loss for DPO and RosePO)."""
    method = _check_method(method)
    return {**OFFICIAL_DPO_ARGS, **({"loss_type": ["sigmoid"]} if method in ("dpo", "rosepo") else {})}
