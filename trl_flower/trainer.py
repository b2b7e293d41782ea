"""`FlowerTrainer`: SFT + λ·flow-balance fine-tuning of an LLM recommender on top of `trl.GRPOTrainer`.

Plumbing only: the prefix tree (`tree.py`), the token targets (`rewards.py`), the losses (`losses.py`) and the trie
logits processor (`decoding.py`) hold the math. The TRL internals this file relies on are listed in `_trl_compat.py`.
"""

from __future__ import annotations

import logging
import os
import textwrap
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, pad

from trl_flower import checkpoint
from trl_flower._trl_compat import completion_eos_ids
from trl_flower.config import FlowerConfig
from trl_flower.losses import (
    chunk_path_states,
    combine_losses,
    detailed_balance_loss,
    flow_log_probs,
    flower_subtb_loss,
    flower_tb_loss,
    full_distribution_loss,
    token_log_probs,
    tree_log_mass,
    tree_normalized_flow_log_probs,
)
from trl_flower.model_card import append_flower_section
from trl_flower.prompt_sharing import continue_on_cache, detached_cache, prompt_forward, shared_prompt_logits
from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.rollout import TrieRolloutMixin
from trl_flower.sampling import sample_on_cache, sampling_warpers
from trl_flower.trainer_checks import (
    COMPLETION_COLUMN,
    check_dataset,
    check_item_groups,
    check_model_and_tree,
    check_tokenizer,
    resolve_reward_model,
)
from trl_flower.tree import PrefixTree

logger = logging.getLogger(__name__)

_PATH_LOSSES = {"flower_subtb": flower_subtb_loss, "db": detailed_balance_loss, "tb": flower_tb_loss}


class FlowerTrainer(TrieRolloutMixin, GRPOTrainer):
    r"""
    Trainer for Flower ([Process-Supervised LLM Recommenders via Flow-guided
    Tuning](https://huggingface.co/papers/2503.07377)): supervised fine-tuning on the target item plus a GFlowNet
    flow-balance loss on items sampled from the policy under a prefix-tree (trie) constraint, with token-level
    process rewards F(s·a)/F(s) from the tree's item flows.

    The only change w.r.t. [`GRPOTrainer`] is what is sampled and what is minimised: rollouts go through the
    inherited transformers path with a [`TrieLogitsProcessor`] added ([`TrieRolloutMixin`]), so every completion is
    a catalogue item; `_generate_and_score_completions` adds the SFT target path and the token-level flow targets
    ([`PrefixTreeRewardModel.token_targets`]) to the batch; and `_compute_loss` returns
    (1 − λ)·SFT + λ·flow loss from one teacher-forced forward with gradient (the prompt runs once, the target and the
    sample continue on its KV cache). Batching, gradient accumulation, reward logging, PEFT, checkpointing and
    distributed training are inherited unchanged. With `flow_lambda=0` nothing is sampled and the trainer is plain
    SFT.

    Args:
        model (`str`, `os.PathLike`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The causal LM to train, or the path of a local model directory (as in [`GRPOTrainer`]). Pass a path
            rather than a loaded model if reference policies may need to reload it.
        tree ([`PrefixTree`]):
            The catalogue's prefix tree over the model's tokens. Its item rewards R(i) (e.g. interaction counts)
            define the flows unless `reward_model` is given. Default mode: item paths end with an EOS token.
        args ([`FlowerConfig`], *optional*):
            Training configuration. If `None`, a default [`FlowerConfig`] is used.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Rows with a `prompt` (text, or a conversation the chat template renders) and the target item id in the
            column `args.item_id_column`; `args.row_index_column` for personalised rewards; `completion` (the SFT
            target text) in `tokenization_mode="reference"`.
        eval_dataset ([`~datasets.Dataset`], *optional*):
            Same format; evaluated with the same loss (sampling included when λ > 0).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer (left padding). Loaded from the model directory if `None`.
        reward_model ([`PrefixTreeRewardModel`], *optional*):
            The token-level reward model on `tree`. If `None`, one is built from the config (`reward_variant`,
            `preference_scores_path`, `nonterminal_log_term`, `row_index_column`); if given, leave those config
            fields at their defaults. It is also passed to GRPO as `reward_funcs`, so the mean sequence reward of the
            samples is logged as `rewards/prefix_tree_reward/mean`.
        item_groups (array of `int`, *optional*):
            Popularity group (0 = most popular) of every item id, shape [num_items]; if given, the share of sampled
            items per group is logged (`sampled/group_{g}_share`) and saved with the model.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration (e.g. LoRA) used to wrap the model.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to customise the training loop.
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler, as in [`~transformers.Trainer`].

    Example:

    ```python
    >>> from trl_flower import FlowerConfig, FlowerTrainer, PrefixTree
    >>> tree = PrefixTree.from_titles(titles, tokenizer, item_rewards=interaction_counts)
    >>> trainer = FlowerTrainer(model="path/to/model", tree=tree, args=FlowerConfig("out", flow_lambda=0.005),
    ...                         train_dataset=dataset)  # columns: prompt, item_id
    >>> trainer.train()
    ```
    """

    sample_in_loss_step: bool = True
    """Sample the items inside the loss step, on the prompt's KV cache (default), instead of in GRPO's `generate`.

    On (and λ > 0, no gradient checkpointing, `steps_per_generation == gradient_accumulation_steps`, no
    `repetition_penalty` or `generation_kwargs`): the prompt runs once, with gradient; each item is sampled under
    `no_grad` on a detached copy of that KV cache (trie-constrained, temperature/top-k/top-p/min-p as configured);
    then the SFT target and the sample continue on the gradient cache. This saves GRPO's separate no-grad prefill of
    the prompt. The sampling randomness is drawn per prompt when the generation batch is built (one uniform per
    prompt and decoding step, split and shuffled with the batch as GRPO does) and each token is drawn by inverse-CDF
    from it, so the samples of a prompt do not depend on how the batch is cut into micro-batches: gradient
    accumulation still equals the full batch. The policy is the same in every micro-batch of an optimiser step, so
    the samples have the same distribution as in the `generate` path, and the gradient is the same (samples are not
    differentiated). Flower's `sampled/*` logs and `num_tokens` are the same on both paths, logged per micro-batch
    instead of per generation batch; GRPO's `completions/*` and `rewards/*` logs exist on its `generate` path only.
    Off (set ``trainer.sample_in_loss_step = False``), or when a condition above fails: TRL's `generate` path.
    """

    _tag_names = ["trl", "flower"]
    _name = "Flower"
    _paper = {
        "title": "Process-Supervised LLM Recommenders via Flow-guided Tuning",
        "id": "2503.07377",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{flower2025,
                title        = {{Process-Supervised LLM Recommenders via Flow-guided Tuning}},
                year         = 2025,
                eprint       = {arXiv:2503.07377},
            }"""),
    }

    def __init__(
        self,
        model,
        tree: PrefixTree,
        args: FlowerConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_model: PrefixTreeRewardModel | None = None,
        item_groups=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if isinstance(model, os.PathLike):
            model = os.fspath(model)  # GRPOTrainer loads a model from a str path only
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = FlowerConfig(f"{model_name.split('/')[-1]}-Flower")
        if not isinstance(args, FlowerConfig):
            raise TypeError(f"`args` must be a FlowerConfig, got {type(args).__name__}; put the settings in one")
        if not isinstance(tree, PrefixTree):
            raise TypeError(f"`tree` must be a trl_flower PrefixTree, got {type(tree).__name__}")
        # Everything checkable without the model is checked before GRPOTrainer loads it.
        self.tree = tree
        self.reward_model = resolve_reward_model(tree, args, reward_model)
        self.item_groups = check_item_groups(item_groups, tree)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_dataset(name, dataset, args, tree, self.reward_model)
        if processing_class is not None:
            check_tokenizer(processing_class, tree)

        super().__init__(
            model=model,
            reward_funcs=[self.reward_model],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        vocab_size = self.model.config.get_text_config().vocab_size
        self._finished_token_id = check_model_and_tree(self.args, self.tree, vocab_size, completion_eos_ids(self))
        self.rollout_tree, self.rollout_finished_token_id = self.reward_model.tree, self._finished_token_id
        # Run the prompt once and continue the SFT target and the sample on its KV cache (see `_state_logits`);
        # gradient checkpointing drops KV caches inside the layers, so it needs the stacked forward.
        self._share_prompt_forward = not self.args.gradient_checkpointing
        self._offline_rng: torch.Generator | None = None  # created on the first offline draw (`_offline_batch`)

    # ------------------------------------------------------------------ dataset columns

    def _set_signature_columns_if_needed(self):
        # With remove_unused_columns=True, keep the columns Flower reads besides GRPO's "prompt".
        super()._set_signature_columns_if_needed()
        extra = [self.args.item_id_column, self.args.row_index_column, COMPLETION_COLUMN]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    # ------------------------------------------------------------------ sampling and batch assembly

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        sft = self._sft_targets(inputs)
        if self.args.flow_lambda == 0.0:
            batch = self._tokenize_prompt_batch(inputs)  # plain SFT: nothing to sample
        elif self._offline_batch():
            # Offline batch: the flow loss runs on the SFT targets, which in the default tokenisation (required for
            # offline batches) are exactly the items' tree paths, teacher-forced; nothing is sampled.
            batch = self._tokenize_prompt_batch(inputs)
            rows = self._rows(inputs, batch["prompt_ids"].device)
            batch.update(self._flow_targets(rows, sft["sft_ids"], log_samples=False))
        elif self._samples_in_loss_step():
            # Sampling happens in `_compute_loss` on the prompt's KV cache; only its randomness is drawn here, one
            # uniform per prompt and decoding step, so that it travels with the prompt through GRPO's split/shuffle.
            batch = self._tokenize_prompt_batch(inputs)
            B = batch["prompt_ids"].shape[0]
            batch["flow_uniforms"] = torch.rand(B, self.max_completion_length, device=batch["prompt_ids"].device)
            if self.reward_model.variant != "none" or self.reward_model.preference_scores is not None:
                batch["flow_rows"] = self._rows(inputs, batch["prompt_ids"].device)  # [B]
        else:
            batch = super()._generate_and_score_completions(inputs)
            completion_ids = batch["completion_ids"]
            batch.update(self._flow_targets(self._rows(inputs, completion_ids.device), completion_ids))
        batch.update(sft)
        return batch

    def offline_trajectory_probability(self) -> float:
        """The probability that the current generation batch is offline (see `offline_trajectory_prob`)."""
        start, final = self.args.offline_trajectory_prob, self.args.offline_trajectory_prob_final
        if final is None or self.state.max_steps <= 1:
            return start
        progress = min(self.state.global_step / (self.state.max_steps - 1), 1.0)
        return start + (final - start) * progress

    def _offline_batch(self) -> bool:
        """Draw whether this generation batch uses offline (teacher-forced target) trajectories; logs the draw."""
        if self.args.offline_trajectory_prob == 0.0 and self.args.offline_trajectory_prob_final is None:
            return False  # feature off: no draw, so a default run consumes exactly the random numbers it did before
        p = self.offline_trajectory_probability()
        if self._offline_rng is None:
            # Its own generator, seeded alike on every process: the ranks draw the same sequence (they call this
            # equally often), and the draws leave the global stream that sampling and dropout use untouched.
            self._offline_rng = torch.Generator().manual_seed(self.args.seed)
        offline = bool(torch.rand((), generator=self._offline_rng) < p)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["flow/offline_prob"].append(p)
        self._metrics[mode]["flow/offline_batch"].append(float(offline))
        return offline

    def _samples_in_loss_step(self) -> bool:
        """Whether items are sampled inside the loss step (see `sample_in_loss_step`)."""
        args = self.args
        return (
            self.sample_in_loss_step
            and args.flow_lambda > 0
            and self._share_prompt_forward
            and args.steps_per_generation == args.gradient_accumulation_steps
            and args.repetition_penalty == 1.0
            and not args.generation_kwargs
        )

    def _rows(self, inputs: list[dict[str, Any]], device) -> torch.Tensor | None:
        """The preference-score row of each prompt ([B]) for personalised rewards, else None."""
        if self.reward_model.variant == "none" and self.reward_model.preference_scores is None:
            return None
        return torch.tensor([int(x[self.reward_model.row_column]) for x in inputs], device=device)

    def _tokenize_prompt_batch(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and mask, tokenised as GRPO does (chat template for conversations)."""
        prompt_ids, _, _ = self._tokenize_prompts([x["prompt"] for x in inputs])
        prompt_ids = [torch.tensor(ids) for ids in prompt_ids]
        device = self.accelerator.device
        return {
            "prompt_ids": pad(prompt_ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            "prompt_mask": pad([torch.ones_like(ids) for ids in prompt_ids], padding_value=0, padding_side="left").to(
                device
            ),
        }

    def _sft_targets(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The SFT target continuation of each prompt: exactly the tokens the model should emit after it."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        if self.args.tokenization_mode == "default":
            items = torch.tensor([int(x[self.args.item_id_column]) for x in inputs], dtype=torch.long)  # [B]
            ids, lengths = self.tree.item_paths(items, pad_id=pad_id)  # [B, L] title tokens + terminator
        else:
            texts = [x[COMPLETION_COLUMN] for x in inputs]
            encoded = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
            eos = self._tokenizer.eos_token_id
            paths = [torch.tensor([*e, eos]) for e in encoded]
            ids = pad(paths, padding_value=pad_id, padding_side="right")  # [B, L]
            lengths = torch.tensor([len(p) for p in paths])  # [B]
        mask = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
        ids, mask = ids.to(device), mask.to(device)
        # Tokens of the whole generation batch on all processes: the SFT token mean is taken over the optimiser step
        # (as transformers does with num_items_in_batch), so gradient accumulation does not change the loss.
        num_tokens = self.accelerator.gather(mask.sum().unsqueeze(0)).sum()
        return {"sft_ids": ids, "sft_mask": mask, "sft_num_tokens": num_tokens}

    def _flow_targets(
        self, rows: torch.Tensor | None, completion_ids: torch.Tensor, log_samples: bool = True
    ) -> dict[str, torch.Tensor]:
        """Token-level flow targets of the sampled items (no gradient); `rows` [B] for personalised rewards.
        `log_samples=False` for offline paths, which are not samples of the policy."""
        target_rows = None if self.reward_model.variant == "none" else rows
        targets = self.reward_model.token_targets(completion_ids, target_rows)
        T = targets.log_reward.shape[1]
        title_mask = torch.arange(T, device=completion_ids.device).unsqueeze(0) < targets.lengths.unsqueeze(1)
        title_ids = torch.where(title_mask, completion_ids[:, :T], self._tokenizer.pad_token_id)  # [B, T]
        out = {
            "flow_title_ids": title_ids,
            "flow_title_mask": title_mask,
            "flow_lengths": targets.lengths,
            "flow_valid": targets.valid,
            "flow_log_reward": targets.log_reward,
            "flow_log_term_target": targets.log_term_target,
        }
        if self.args.flow_loss == "full_distribution":
            children = self.reward_model.child_targets(targets.nodes, target_rows, targets.terminal_nodes)
            tokens, log_rewards, child_mask = children
            out.update(
                flow_child_tokens=tokens,  # [B, T+1, K]
                flow_child_log_rewards=log_rewards,  # [B, T+1, K]
                flow_child_mask=child_mask,  # [B, T+1, K]
                flow_state_mask=targets.nodes >= 0,  # [B, T+1]
            )
        elif self.args.flow_policy_support == "tree":  # the children of each state, to renormalise π over them
            B, S = targets.nodes.shape
            tokens, _, child_mask = self.tree.children(targets.nodes.reshape(-1))  # [B*S, K]
            out.update(flow_child_tokens=tokens.reshape(B, S, -1), flow_child_mask=child_mask.reshape(B, S, -1))
        if log_samples:
            self._log_sampled_items(completion_ids, targets, rows)
        return out

    def _log_sampled_items(self, completion_ids: torch.Tensor, targets, rows: torch.Tensor | None) -> None:
        """Flower's logs of the policy's samples, the same on both sampling paths (`sampled/*`).

        GRPO's own `completions/*` and `rewards/*` logs come from TRL's generate path; the in-loss sampler does not
        repeat them (it keeps only the token count of the trainer state, `_count_in_loss_tokens`).
        """
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        items = gather(targets.item_ids)  # [B_global], -1 for incomplete samples
        valid = gather(targets.valid.long())  # [B_global]
        metrics["sampled/valid_share"].append(valid.float().mean().item())
        complete = items >= 0
        lengths = gather(targets.lengths + 1)[complete]  # [n] item path lengths, terminator included
        metrics["sampled/mean_length"].append(lengths.float().mean().item() if lengths.numel() else 0.0)
        kwargs = {} if rows is None else {self.reward_model.row_column: rows.tolist()}
        B = completion_ids.shape[0]
        rewards = self.reward_model(
            prompts=[None] * B, completions=[""] * B, completion_ids=completion_ids.tolist(), **kwargs
        )
        rewards = gather(torch.tensor(rewards, dtype=torch.float32, device=completion_ids.device))  # [B_global]
        metrics["sampled/reward_mean"].append(rewards.mean().item())
        items = items[complete]
        metrics["sampled/distinct_items"].append(float(items.unique().numel()))
        if self.item_groups is not None and items.numel():
            groups = self.item_groups.to(items.device)[items]  # [n]
            share = torch.bincount(groups, minlength=self._num_groups).double() / items.numel()  # [G]
            for g, value in enumerate(share.tolist()):
                metrics[f"sampled/group_{g}_share"].append(value)

    def _count_in_loss_tokens(self, prompt_mask: torch.Tensor, completion_ids: torch.Tensor) -> None:
        """Add the in-loss samples' prompt and completion tokens to the trainer state (GRPO counts its own)."""
        mode = "train" if self.model.training else "eval"
        eos = torch.tensor(completion_eos_ids(self), device=completion_ids.device)
        is_eos = torch.isin(completion_ids, eos)  # [B, T]
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.shape[1])  # [B]
        tokens = self.accelerator.gather(prompt_mask.sum() + lengths.sum()).sum()
        if mode == "train":
            self.state.num_input_tokens_seen += tokens.item()
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]

    @property
    def _num_groups(self) -> int:
        return int(self.item_groups.max()) + 1

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        lam = self.args.flow_lambda
        # Continuations after the prompt; state s_k's logits predict token k+1. The SFT target feeds all its tokens
        # but the last (states s_0 … s_{L-1}); the sampled title feeds all its title tokens (states s_0 … s_t, where
        # the terminator is decided).
        continuations = [(inputs["sft_ids"][:, :-1], inputs["sft_mask"][:, :-1])]
        if lam > 0 and "flow_uniforms" in inputs:
            # Sample on the prompt's KV cache: prompt forward with gradient, sampling on a detached copy of its
            # cache, then the target and the sample continue on the gradient cache (see `sample_in_loss_step`).
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            first, cache = prompt_forward(model, prompt_ids, prompt_mask)
            if cache is None:
                raise RuntimeError(
                    "sample_in_loss_step needs a model that returns a KV cache (use_cache=True); set "
                    "`trainer.sample_in_loss_step = False` to sample with TRL's generate instead."
                )
            completion_ids = self._sample_items(
                model, first.detach(), detached_cache(cache), prompt_mask, inputs["flow_uniforms"]
            )
            inputs = {**inputs, **self._flow_targets(inputs.get("flow_rows"), completion_ids)}
            self._count_in_loss_tokens(prompt_mask, completion_ids)
            continuations.append((inputs["flow_title_ids"], inputs["flow_title_mask"]))
            state_logits = continue_on_cache(
                model, first, cache, prompt_mask, continuations, self._tokenizer.pad_token_id
            )
        else:
            if lam > 0:
                continuations.append((inputs["flow_title_ids"], inputs["flow_title_mask"]))
            state_logits = self._state_logits(model, inputs["prompt_ids"], inputs["prompt_mask"], continuations)

        # SFT: token-sum of the cross-entropy over the targets, normalised by the target tokens of the whole
        # optimiser step (GRPO's "dapo" normalisation), so the returned loss is already scaled for accumulation.
        sft_mask = inputs["sft_mask"]
        token_nll = -token_log_probs(state_logits[0], inputs["sft_ids"].unsqueeze(-1)).squeeze(-1)  # [B, L]
        nll_sum = torch.where(sft_mask, token_nll, 0.0).sum()
        normalizer = inputs["sft_num_tokens"].clamp(min=1).float() / self.accelerator.num_processes
        accumulation = 1.0
        if mode == "train":
            # set by the training loop (shorter for the last window of an epoch); absent when called outside it
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        sft = nll_sum / normalizer

        flow = torch.zeros((), device=sft.device)
        if lam > 0:
            flow = self._flow_loss(state_logits[1], inputs).to(sft.dtype)
        loss = combine_losses(sft, flow / accumulation, lam)

        local_sft_mean = nll_sum.detach() / sft_mask.sum().clamp(min=1)
        self._metrics[mode]["sft_loss"].append(self.accelerator.gather(local_sft_mean.unsqueeze(0)).mean().item())
        if lam > 0:
            self._metrics[mode]["flow_loss"].append(self.accelerator.gather(flow.detach().unsqueeze(0)).mean().item())
        return loss

    def _flow_loss(self, state_logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The configured flow loss on the valid sampled paths; `state_logits` [B, T+1, V] at states s_0 … s_T."""
        keep = inputs["flow_valid"]  # [B]; incomplete or zero-reward samples carry no finite target
        if not bool(keep.any()):
            return state_logits.sum() * 0.0  # keeps the graph connected (DDP) without a signal
        on_tree = self.args.flow_policy_support == "tree"
        if on_tree or self.args.flow_loss == "full_distribution":
            child_log_probs = token_log_probs(state_logits, inputs["flow_child_tokens"])  # [B, T+1, K]
        if on_tree:  # log Σ_children π: the policy's mass on the tree's actions at each state
            log_mass = tree_log_mass(child_log_probs, inputs["flow_child_mask"])  # [B, T+1]
        if self.args.flow_loss == "full_distribution":
            if on_tree:
                child_log_probs = child_log_probs - log_mass.unsqueeze(-1)
            return full_distribution_loss(
                child_log_probs[keep],
                inputs["flow_child_log_rewards"][keep],
                inputs["flow_child_mask"][keep],
                inputs["flow_state_mask"][keep],
            )
        log_pf, log_pterm = flow_log_probs(state_logits, inputs["flow_title_ids"], self.tree.terminator_id)
        if on_tree:
            is_term = inputs["flow_child_tokens"] == self.tree.terminator_id  # [B, T+1, K]
            term_allowed = (is_term & inputs["flow_child_mask"]).any(dim=-1)  # [B, T+1]: s_k is a complete title
            log_pf, log_pterm = tree_normalized_flow_log_probs(
                log_pf, log_pterm, inputs["flow_log_term_target"], log_mass, term_allowed
            )
        args = (
            log_pf[keep],  # [B', T]
            log_pterm[keep],  # [B', T+1]
            inputs["flow_log_reward"][keep],  # [B', T]
            inputs["flow_log_term_target"][keep],  # [B', T+1]
            inputs["flow_lengths"][keep],  # [B']
        )
        if self.args.state_granularity > 1:  # states every n tokens (RQ4): chunk the path before the loss
            args = chunk_path_states(*args, n=self.args.state_granularity)
        if self.args.flow_loss == "flower_subtb":
            return flower_subtb_loss(*args, subtb_lambda=self.args.subtb_lambda)
        return _PATH_LOSSES[self.args.flow_loss](*args)

    def _state_logits(
        self,
        model,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        continuations: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Logits at the states after the prompt for several continuations of the same prompts, with gradient.

        Continuation i (ids and mask [B, n_i], right-padded) yields logits [B, n_i + 1, V] at the states
        s_0 … s_{n_i} (s_0 = end of the prompt). With two or more continuations the prompt [B, P] runs once and
        its KV cache is repeated for the continuations (the gradient flows back into the prompt through the
        cache); this halves the forward cost for Flower's long prompts and short titles. Gradient checkpointing
        drops caches, so then (and with a single continuation) the rows [prompt + continuation_i] run stacked.
        """
        return shared_prompt_logits(
            model, prompt_ids, prompt_mask, continuations, self._tokenizer.pad_token_id, self._share_prompt_forward
        )

    def _sample_items(self, model, first, cache, prompt_mask, uniforms) -> torch.Tensor:
        """Trie-constrained on-policy samples on a detached prompt cache (`sampling.sample_on_cache`); [B, T]."""
        trie = self.rollout_logits_processor(prompt_length=0)  # the generate path's processor (`TrieRolloutMixin`)
        args = self.args
        warpers = sampling_warpers(args.temperature, args.top_k, args.top_p, args.min_p)
        return sample_on_cache(
            model,
            first,
            cache,
            prompt_mask,
            uniforms,
            trie,
            completion_eos_ids(self),
            self._tokenizer.pad_token_id,
            warpers,
        )

    # ------------------------------------------------------------------ resuming and saving

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, after checking the checkpoint to resume from (if any) file by file.

        A damaged weight, optimizer, scheduler or trainer-state file raises a ValueError that names the file and the
        other checkpoints of the run, before anything is loaded; a missing RNG state warns
        (`trl_flower.checkpoint.check_resume_checkpoint`). Arguments as in [`~transformers.Trainer.train`].
        """
        path = checkpoint.resume_checkpoint_dir(resume_from_checkpoint, self.args.output_dir)
        if path is not None:
            checkpoint.check_resume_checkpoint(
                path, world_size=self.args.world_size, process_index=self.args.process_index
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        # The Trainer saves the global RNG states with each checkpoint; the offline draws have their own generator
        # (`_offline_batch`), saved beside them so that a resumed run continues the same draw sequence. Every rank
        # holds the same state, so one file written by the main process serves all.
        super()._save_rng_state(output_dir)
        if self._offline_rng is not None and self.args.should_save:
            checkpoint.save_offline_rng(output_dir, self._offline_rng)

    def _load_rng_state(self, checkpoint_dir: str | None) -> None:
        super()._load_rng_state(checkpoint_dir)
        if checkpoint_dir is not None:
            self._offline_rng = checkpoint.load_offline_rng(checkpoint_dir) or self._offline_rng

    def _save(self, output_dir: str | None = None, state_dict=None):
        # A plain Hugging Face model directory (weights, config, generation config, tokenizer, chat template) from
        # the parent, plus the tree, the Flower record and the item groups (`trl_flower.checkpoint`).
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            checkpoint.save_run_files(
                output_dir if output_dir is not None else self.args.output_dir,
                tree=self.reward_model.tree,
                record=self.flower_record(),
                item_groups=self.item_groups,
            )

    def flower_record(self) -> dict[str, Any]:
        """The Flower record saved beside the weights (`trl_flower.checkpoint.flower_record`)."""
        return checkpoint.flower_record(
            self.args, self.tree, self.reward_model, self._finished_token_id, self.item_groups is not None
        )

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ):
        """TRL's model card (method, paper, citation, versions), plus the run's Flower settings."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            append_flower_section(checkpoint.model_card_path(self.args.output_dir), self.flower_record())
