"""The one trie-constrained rollout hook for TRL's GRPO-family trainers (GRPO, RLOO and FlowerTrainer).

GRPOTrainer and RLOOTrainer generate their rollouts in ``_generate_single_turn`` through transformers' ``generate``,
which takes no logits processor from the trainer. :class:`TrieRolloutMixin` wraps that inherited call with
`trl_flower._trl_compat.constrained_generate`, so that every rollout is a catalogue item of the trainer's prefix
tree: padding, multimodal fields, DeepSpeed ZeRO-3 gathering and EOS cutting stay TRL's.

Use it as the first base of a GRPO-family trainer and set :attr:`~TrieRolloutMixin.rollout_tree` before training::

    class TrieConstrainedRLOOTrainer(TrieRolloutMixin, RLOOTrainer): ...

`FlowerTrainer` uses it for its `generate` path, and its in-loss sampler takes the same processor
(:meth:`TrieRolloutMixin.rollout_logits_processor`). PPO (trl 1.11/1.12) generates through a module-level function
instead and is constrained in `trl_flower.chain`, with the same processor class.
"""

from __future__ import annotations

from trl_flower._trl_compat import constrained_generate
from trl_flower.decoding import TrieLogitsProcessor
from trl_flower.tree import PrefixTree

__all__ = ["TrieRolloutMixin"]


class TrieRolloutMixin:
    """Trie-constrained rollouts for a trainer with GRPO's ``_generate_single_turn`` (GRPO, RLOO, FlowerTrainer).

    Attributes:
        rollout_tree: the prefix tree the rollouts follow; set it before training.
        rollout_finished_token_id: the only token allowed after a complete item (None: the tree's terminator).
    """

    rollout_tree: PrefixTree | None = None
    rollout_finished_token_id: int | None = None

    def rollout_logits_processor(self, prompt_length: int | None = None) -> TrieLogitsProcessor:
        """A fresh trie processor for one rollout (processors are stateful): catalogue items with reward > 0 only.

        Args:
            prompt_length: the padded prompt length of the token rows the processor sees (None: inferred at the
                first call, as inside ``generate``; 0 for a sampler that passes only the generated tokens).
        """
        if self.rollout_tree is None:
            raise ValueError(
                f"{type(self).__name__}.rollout_tree is not set; assign the catalogue's PrefixTree before training."
            )
        return TrieLogitsProcessor(
            self.rollout_tree,
            prompt_length=prompt_length,
            finished_token_id=self.rollout_finished_token_id,
            positive_flow_only=True,
        )

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        # The inherited transformers path generates (its signature drifts across TRL versions, hence *args); the
        # trie processor is added to its `generate` call.
        with constrained_generate(self.accelerator.unwrap_model(self.model_wrapped), self.rollout_logits_processor):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
