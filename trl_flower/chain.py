"""Hand a Flower checkpoint to TRL's DPO, GRPO, RLOO and PPO trainers as reference policy and/or policy init.

A Flower checkpoint is a plain Hugging Face model directory (weights, config, tokenizer, chat template, generation
config), so most chains need no code from this module (docs/chaining.md has runnable snippets):

* **DPO**, reference = policy init = Flower: ``DPOTrainer(model=flower_dir, ...)`` (TRL reloads the reference from
  the same path). Reference = Flower, another policy init:
  ``DPOTrainer(model=init_dir, ref_model=load_reference_policy(flower_dir), ...)``.
* **GRPO / RLOO** with ``beta > 0``, reference = policy init = Flower: ``GRPOTrainer(model=flower_dir, ...)``
  (TRL rebuilds the reference from the policy's path). These trainers take no ``ref_model``; for a reference that
  differs from the policy init use :func:`set_reference_policy` on the built trainer.
* **PPO** (``trl.experimental.ppo``, present only in trl 1.11.x and 1.12.x): :func:`make_ppo_trainer` builds a
  ``PPOTrainer`` with the Flower checkpoint as ``ref_model`` and a :class:`~trl_flower.rewards.PrefixTreeRewardModel`
  as reward, and makes the rollouts catalogue-constrained. On a newer trl it raises :class:`PPOUnavailableError`
  naming the versions that have PPO and pointing to RLOO/GRPO with ``beta > 0``.

What PPO needs beyond its public arguments (trl 1.11/1.12 read both from module-level functions of
``trl.experimental.ppo.ppo_trainer``, which are wrapped here; the wrappers fall back to TRL's functions for every
model they do not know, so other PPO trainers in the same process are unaffected):

1. *Reward.* PPO scores a rollout with ``get_reward(reward_model, query_responses, pad_token_id, context_length)``,
   which expects a sequence-classification model (a backbone plus a ``score`` head) and never passes the context
   length to the head. :class:`TreeRewardScorer` is a parameter-free ``nn.Module`` (one frozen anchor parameter so
   ``.to()`` and DeepSpeed accept it) and the wrapped ``get_reward`` dispatches to
   :meth:`TreeRewardScorer.get_reward`, which cuts the response after the prompt and calls the reward model.
2. *Constrained rollouts.* PPO builds its ``GenerationConfig`` inside ``train()`` and calls ``generate`` without a
   logits processor; the wrapped ``generate`` adds a :class:`~trl_flower.decoding.TrieLogitsProcessor` for policies
   registered by :func:`make_ppo_trainer`.
3. *Unmasked log-probs.* PPO's rollout ("old") log-probs come from ``generate``'s ``scores``, i.e. the processed
   logits, which the trie sets to −inf; its training pass re-scores with the model's raw logits. With a mask the
   importance ratio collapses (measured: ratio 0.011, approx-KL 12.8 at the first update). The wrapped ``generate``
   therefore returns the raw logits (``output_logits=True``) divided by the temperature, the same unmasked log π
   convention Flower uses, which gives ratio 1.0 at the first update.

Nothing here copies TRL code; TRL objects are imported and called.
"""

from __future__ import annotations

import functools
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PPO_TRL_VERSIONS = ("1.11", "1.12")
"""TRL minor versions whose ``trl.experimental.ppo`` has the ``PPOTrainer`` this module drives."""

__all__ = [
    "PPO_TRL_VERSIONS",
    "PPOUnavailableError",
    "TreeRewardScorer",
    "load_reference_policy",
    "make_ppo_trainer",
    "require_ppo",
    "set_reference_policy",
]


def load_reference_policy(
    model: str | os.PathLike | PreTrainedModel, dtype: torch.dtype | str | None = None
) -> PreTrainedModel:
    """Load a checkpoint as a frozen reference policy (eval mode, no gradients).

    Args:
        model: a model directory (e.g. a Flower checkpoint) or an already loaded causal LM.
        dtype: the dtype to load in (e.g. the policy's ``model.dtype``); default: the checkpoint's own.

    Returns:
        The causal LM with ``requires_grad=False`` on every parameter, ready for ``DPOTrainer(ref_model=...)``,
        ``PPOTrainer(ref_model=...)`` or :func:`set_reference_policy`.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        ref = model if dtype is None else model.to(dtype=_as_dtype(dtype))
    else:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model directory (no config.json); pass the directory a Flower run "
                "saved with trainer.save_model() / model.save_pretrained()"
            )
        kwargs = {} if dtype is None else {"dtype": _as_dtype(dtype)}
        ref = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


# --------------------------------------------------------------------------------------------- GRPO / RLOO


def set_reference_policy(trainer, ref_model: str | os.PathLike | PreTrainedModel):
    """Make `ref_model` the KL reference of a built ``GRPOTrainer`` or ``RLOOTrainer`` (``beta > 0``).

    TRL's GRPO and RLOO take no ``ref_model`` argument: with ``beta > 0`` they reload the reference from the
    policy's own path. Use this when the reference must differ from the policy init, e.g. policy init = an SFT model
    and reference = the Flower checkpoint. The new reference is prepared the way the trainer prepares its own
    (dropout disabled if ``args.disable_dropout``, TRL's fused LM head on trl >= 1.15, DeepSpeed / FSDP / plain
    accelerate preparation in evaluation mode). Call it right after building the trainer, before ``train()``.

    Args:
        trainer: a ``trl.GRPOTrainer`` or ``trl.RLOOTrainer`` (or a subclass such as ``FlowerTrainer``).
        ref_model: a model directory or a loaded causal LM.

    Returns:
        The trainer (for chaining).

    Raises:
        ValueError: ``beta == 0`` (no reference is used), a PEFT policy (its reference is the adapter-disabled base
            model; merge the adapter and save a full model instead), or ``sync_ref_model=True`` (TRL would keep
            syncing its own copy).
    """
    beta = getattr(trainer, "beta", None)
    if beta is None or not hasattr(trainer, "ref_model"):
        raise ValueError(f"set_reference_policy expects a GRPOTrainer or RLOOTrainer, got {type(trainer).__name__}")
    if beta == 0.0:
        raise ValueError(
            "the trainer has beta=0.0, so it uses no reference policy; set beta > 0 in the config (e.g. beta=0.04) to "
            "regularise towards the Flower checkpoint"
        )
    if trainer.ref_model is None:
        raise ValueError(
            "the trainer has no separate reference model: with a PEFT policy TRL's reference is the base model "
            "with the "
            "adapter disabled. Merge the Flower adapter into a full model (merge_and_unload + save_pretrained) and "
            "start from that, or pass a full (non-PEFT) policy"
        )
    if getattr(trainer.args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True would keep overwriting the reference with the policy (TR-DPO style); set "
            "sync_ref_model=False to keep the Flower checkpoint as the reference"
        )
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import disable_dropout_in_model

    policy = trainer.accelerator.unwrap_model(trainer.model)
    ref = load_reference_policy(ref_model, dtype=policy.dtype)
    if getattr(trainer.args, "disable_dropout", False):
        disable_dropout_in_model(ref)
    try:  # trl >= 1.15 scores log-probs through a fused LM head patched onto policy and reference
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        pass
    else:
        add_fused_lm_head(
            ref,
            temperature=trainer.temperature,
            cast_lm_head_to_fp32=getattr(trainer.args, "cast_lm_head_to_fp32", False),
        )
    if trainer.is_deepspeed_enabled:
        ref = prepare_deepspeed(ref, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        ref = prepare_fsdp(ref, trainer.accelerator)
    else:
        ref = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
    trainer.ref_model = ref
    return trainer


# --------------------------------------------------------------------------------------------- PPO


class PPOUnavailableError(ImportError):
    """The installed TRL has no ``trl.experimental.ppo.PPOTrainer`` (it exists only in trl 1.11.x and 1.12.x)."""


def require_ppo():
    """Import and return ``trl.experimental.ppo.ppo_trainer`` (the module), or raise :class:`PPOUnavailableError`.

    Raises:
        PPOUnavailableError: the installed trl has no experimental PPO; the message names the versions that have it
            and the alternatives (RLOO/GRPO with ``beta > 0`` and the Flower checkpoint as reference).
    """
    import trl

    version = trl.__version__
    minor = ".".join(version.split(".")[:2])
    problem = None
    if minor not in PPO_TRL_VERSIONS:
        problem = f"the installed trl is {version}"
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.ppo import ppo_trainer
        except ImportError as err:  # e.g. trl <= 1.13 without `requests`
            problem = f"importing trl.experimental.ppo from trl {version} failed ({err})"
        else:
            return ppo_trainer
    raise PPOUnavailableError(
        f"PPO chaining needs TRL's PPOTrainer (trl.experimental.ppo), which exists only in trl "
        f"{' and '.join(v + '.x' for v in PPO_TRL_VERSIONS)} (removed in 1.13.0); {problem}. Either run PPO in a "
        "separate environment with `pip install 'trl==1.12.0' requests` (the Flower checkpoint is a plain Hugging "
        "Face directory, so it moves between environments as is), or use RLOOTrainer / GRPOTrainer with beta > 0 "
        "and the Flower checkpoint as reference (model=flower_dir, or trl_flower.chain.set_reference_policy), with "
        "PrefixTreeRewardModel as reward function."
    )


class TreeRewardScorer(nn.Module):
    """A :class:`~trl_flower.rewards.PrefixTreeRewardModel` in the place of PPO's ``reward_model``.

    PPO passes its reward model through ``disable_dropout_in_model``, ``.to(device)`` and (under DeepSpeed)
    ``prepare_deepspeed``; this module satisfies all three with one frozen anchor parameter and a ``config`` that has
    ``hidden_size``. The scoring itself is :meth:`get_reward`, which the ``get_reward`` wrapper installed by
    :func:`make_ppo_trainer` calls instead of TRL's backbone + ``score``-head protocol.

    Args:
        reward: the tree reward; its ``__call__`` gives one scalar per completion (see its ``sequence_reward``).
        pad_token_id: the tokenizer's pad id; response tokens from the first pad on are dropped.
    """

    def __init__(self, reward: PrefixTreeRewardModel, pad_token_id: int) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        if not isinstance(reward, PrefixTreeRewardModel):
            raise TypeError(f"`reward` must be a trl_flower PrefixTreeRewardModel, got {type(reward).__name__}")
        if reward.preference_scores is not None:
            raise ValueError(
                "PPO's reward call sees only token ids, not the dataset row, so a personalised PrefixTreeRewardModel "
                "(preference_scores) cannot be used; use RLOOTrainer/GRPOTrainer, whose reward functions receive the "
                "row_index column, or a non-personalised reward"
            )
        self.reward = reward
        self.pad_token_id = int(pad_token_id)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device and a dtype
        self.config = PretrainedConfig(hidden_size=1)

    def forward(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """Rewards [B] (float32, on the anchor's device) of completions given as token-id lists."""
        n = len(completion_ids)
        scores = self.reward(prompts=[""] * n, completions=[""] * n, completion_ids=completion_ids)
        return torch.tensor(scores, dtype=torch.float32, device=self.anchor.device)

    def get_reward(
        self, query_responses: torch.Tensor, pad_token_id: int, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO's ``get_reward`` contract: (per-position reward logits [B, T, 1], final rewards [B], end indices [B]).

        The reward of a row is placed at its last non-pad position, where PPO reads it.
        """
        responses = query_responses[:, context_length:]  # [B, R]
        is_pad = responses == pad_token_id  # [B, R]
        length = torch.where(is_pad.any(1), is_pad.int().argmax(1), responses.shape[1])  # [B] first pad, else R
        ids = [row[:n].tolist() for row, n in zip(responses, length.tolist())]
        final = self(ids).to(query_responses.device)  # [B]
        end = length - 1 + context_length  # [B] index of the last response token
        logits = torch.zeros(*query_responses.shape, 1, dtype=final.dtype, device=final.device)  # [B, T, 1]
        logits[torch.arange(final.shape[0], device=final.device), end.clamp(min=0), 0] = final
        return logits, final, end


# policies whose PPO rollouts are trie-constrained -> their tree (weak: a finished trainer does not leak)
_ROLLOUT_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(module):
    """The module inside a DeepSpeed engine / DDP wrapper (both expose ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def _constrained_generate(lm_backbone, queries: torch.Tensor, pad_token_id: int, generation_config, tree: PrefixTree):
    """PPO's ``generate`` contract with a trie constraint: (query + response ids, unmasked logits / T [B, R, V])."""
    from transformers import LogitsProcessorList

    context_length = queries.shape[1]
    attention_mask = queries != pad_token_id  # [B, P]
    input_ids = queries.masked_fill(~attention_mask, 0)  # pad ids are never looked up
    out = lm_backbone.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=LogitsProcessorList([TrieLogitsProcessor(tree, prompt_length=context_length)]),
        return_dict_in_generate=True,
        output_logits=True,  # raw logits: PPO re-scores with raw logits, so the ratio starts at 1
    )
    temperature = float(generation_config.temperature or 1.0)
    logits = torch.stack(out.logits, dim=1) / temperature  # [B, R, V]
    return torch.cat((queries, out.sequences[:, context_length:]), dim=1), logits


def _install_ppo_hooks(ppo_module) -> None:
    """Wrap ``generate`` and ``get_reward`` of trl's PPO module once; unknown models go to TRL's own functions."""
    if getattr(ppo_module, "_trl_flower_hooks", False):
        return
    trl_generate, trl_get_reward = ppo_module.generate, ppo_module.get_reward

    @functools.wraps(trl_generate)
    def generate(lm_backbone, queries, pad_token_id, generation_config):
        tree = _ROLLOUT_TREES.get(_unwrap(lm_backbone))
        if tree is None:
            return trl_generate(lm_backbone, queries, pad_token_id, generation_config)
        return _constrained_generate(lm_backbone, queries, pad_token_id, generation_config, tree)

    @functools.wraps(trl_get_reward)
    def get_reward(model, query_responses, pad_token_id, context_length):
        scorer = _unwrap(model)
        if isinstance(scorer, TreeRewardScorer):
            return scorer.get_reward(query_responses, pad_token_id, context_length)
        return trl_get_reward(model, query_responses, pad_token_id, context_length)

    ppo_module.generate, ppo_module.get_reward = generate, get_reward
    ppo_module._trl_flower_hooks = True


def make_ppo_trainer(
    args,
    *,
    model: str | os.PathLike | PreTrainedModel,
    ref_model: str | os.PathLike | PreTrainedModel,
    reward: PrefixTreeRewardModel,
    train_dataset,
    processing_class=None,
    value_model: str | os.PathLike | PreTrainedModel | None = None,
    eval_dataset=None,
    constrain_rollouts: bool = True,
    **kwargs: Any,
):
    """A trl 1.11/1.12 ``PPOTrainer`` with a Flower checkpoint as reference and the prefix-tree reward.

    Args:
        args: a ``trl.experimental.ppo.PPOConfig``; ``stop_token="eos"`` (or ``stop_token_id`` = the tree's
            terminator) is required so that responses end where the item path ends.
        model: the policy init (path or model), often the Flower checkpoint itself.
        ref_model: the reference policy, the Flower checkpoint (path or model; loaded with
            :func:`load_reference_policy`). Must not be the same object as `model`.
        reward: the reward; wrapped in a :class:`TreeRewardScorer`. Non-personalised only (PPO's reward call does
            not see the dataset row).
        train_dataset: a ``datasets.Dataset`` with pre-tokenised ``input_ids``, or with a ``prompt`` column of
            strings, which is tokenised here (no special tokens; every other column is dropped, as PPO's collator
            pads only token columns).
        processing_class: the tokenizer (left padding, pad != eos); default: loaded from `model`'s path.
        value_model: the value model (path or model with a ``score`` head); default:
            ``AutoModelForSequenceClassification.from_pretrained(<model path>, num_labels=1)`` (new score head).
        eval_dataset: like `train_dataset`; default: the first rows of `train_dataset` (PPO builds an eval loader).
        constrain_rollouts: restrict rollouts to catalogue items with a :class:`TrieLogitsProcessor` over
            ``reward.tree`` and return unmasked rollout logits (see the module docstring). ``False`` leaves TRL's
            generation untouched (invalid completions then get ``reward.invalid_reward``).
        **kwargs: passed to ``PPOTrainer`` (``callbacks``, ``optimizers``, ``peft_config``, ...).

    Returns:
        The ``PPOTrainer``; call ``.train()``.

    Raises:
        PPOUnavailableError: the installed trl has no experimental PPO (see :func:`require_ppo`).
        ValueError: no stop token, a stop token other than the tree's terminator, or a tokenizer whose pad equals eos.
    """
    ppo_module = require_ppo()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

    tree = reward.tree
    policy = model if isinstance(model, PreTrainedModel) else AutoModelForCausalLM.from_pretrained(model)
    policy_path = model if not isinstance(model, PreTrainedModel) else policy.config._name_or_path
    if processing_class is None:
        processing_class = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    tok = processing_class
    stop_id = tok.eos_token_id if args.stop_token == "eos" else args.stop_token_id
    if stop_id is None:
        raise ValueError(
            "PPOConfig has no stop token, so responses would run past the item's terminator; set stop_token='eos' "
            f"(or stop_token_id={tree.terminator_id}, the tree's terminator)"
        )
    if stop_id != tree.terminator_id:
        raise ValueError(
            f"PPO stops responses at token {stop_id} but item paths end with the tree's terminator "
            f"{tree.terminator_id}; build the tree with terminator_id={stop_id} or set "
            f"stop_token_id={tree.terminator_id}"
        )
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ValueError(
            "PPO masks pad tokens everywhere, so the tokenizer needs a pad token different from eos "
            f"(pad={tok.pad_token_id}, eos={tok.eos_token_id}); add one, e.g. tokenizer.add_special_tokens"
        )
    if value_model is None or not isinstance(value_model, nn.Module):
        value_model = AutoModelForSequenceClassification.from_pretrained(value_model or policy_path, num_labels=1)
    if value_model.config.pad_token_id is None:
        value_model.config.pad_token_id = tok.pad_token_id
    ref = load_reference_policy(ref_model)
    train_dataset = _tokenized_for_ppo(train_dataset, tok)
    eval_dataset = (
        _tokenized_for_ppo(eval_dataset, tok)
        if eval_dataset is not None
        else train_dataset.select(range(min(len(train_dataset), args.per_device_eval_batch_size)))
    )
    _install_ppo_hooks(ppo_module)
    trainer = ppo_module.PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=TreeRewardScorer(reward, tok.pad_token_id),
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=eval_dataset,
        **kwargs,
    )
    if constrain_rollouts:
        _ROLLOUT_TREES[_unwrap(trainer.policy_model)] = tree
    return trainer


def _tokenized_for_ppo(dataset, tokenizer):
    """`dataset` with only ``input_ids`` (tokenised from ``prompt`` when needed; no special tokens)."""
    if "input_ids" not in dataset.column_names:
        if "prompt" not in dataset.column_names:
            raise ValueError(f"the PPO dataset needs an `input_ids` or a `prompt` column, got {dataset.column_names}")
        if dataset.num_rows and not isinstance(dataset[0]["prompt"], str):
            raise ValueError("PPO prompts must be plain strings; render conversations with the chat template first")
        dataset = dataset.map(
            lambda batch: {"input_ids": tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]},
            batched=True,
        )
    return dataset.select_columns(["input_ids"])
