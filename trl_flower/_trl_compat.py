"""Everything FlowerTrainer/FlowerConfig assume about TRL internals, in one place (supported: ``trl>=1.12,<1.17``).

FlowerTrainer overrides private GRPOTrainer hooks. Each assumption below names the TRL versions it was checked
against, so that bumping TRL means re-reading this file (and running the trl 1.12 compatibility job), not the
trainer. Nothing here copies TRL code: the shims only call TRL, or wrap what TRL calls.

Drift handled here (trl 1.12 → 1.16):

* ``GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, [num_generations,] has_tool_images)``:
  ``num_generations`` appeared in 1.14. FlowerTrainer forwards ``*args, **kwargs`` untouched, so both signatures
  work; the trie constraint is injected around the call (:func:`constrained_generate`), not by re-implementing it.
* ``GRPOTrainer.eos_token_ids`` (every EOS id that ends a completion) appeared in 1.14; 1.12 cuts completions at
  ``tokenizer.eos_token_id`` only (:func:`completion_eos_ids`).
* ``GRPOConfig.__post_init__`` rejects ``num_generations < 2`` in every version; Flower samples one trajectory per
  prompt (:func:`grpo_post_init_with_one_generation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def grpo_post_init_with_one_generation(config, parent_post_init: Callable[[], None]) -> None:
    """Run ``GRPOConfig.__post_init__`` (`parent_post_init`) for a config with ``num_generations == 1``.

    GRPOConfig (1.12–1.16) rejects ``num_generations < 2`` because GRPO needs a group of completions per prompt to
    compute advantages. Flower's flow losses need no group, and GRPOTrainer runs with one generation (its reward
    std is guarded by ``num_generations > 1``). The parent also checks that the generation batch and the eval batch
    hold whole groups, which is vacuous for groups of 1 but fails for groups of 2 when the batch is odd.

    So the parent runs with ``num_generations=2``, ``num_generations_eval`` defaulting to 1 (its divisibility check
    is then vacuous) and a generation batch of twice the requested size (always even), obtained by doubling whichever
    of ``generation_batch_size`` / ``steps_per_generation`` the user set (``steps_per_generation`` defaults to
    ``gradient_accumulation_steps``, as in GRPOConfig). Per-device batch sizes and gradient accumulation are never
    touched, so DeepSpeed's "auto" batch fields (filled inside ``TrainingArguments.__post_init__``) stay correct.
    Afterwards the requested values are restored and the parent's one remaining check on a user-given
    ``generation_batch_size`` (divisible by the global batch) is re-applied to the real size.
    """
    eval_generations = config.num_generations_eval
    user_generation_batch = config.generation_batch_size
    if user_generation_batch is not None:
        config.generation_batch_size = 2 * user_generation_batch
    elif config.steps_per_generation is not None:
        config.steps_per_generation = 2 * config.steps_per_generation
    else:
        config.steps_per_generation = 2 * config.gradient_accumulation_steps
    config.num_generations = 2
    if eval_generations is None:
        config.num_generations_eval = 1
    try:
        parent_post_init()
    finally:
        config.num_generations = 1
        config.num_generations_eval = eval_generations
    config.generation_batch_size //= 2
    config.steps_per_generation //= 2
    global_batch = config.per_device_train_batch_size * config.world_size
    if user_generation_batch is not None and user_generation_batch % global_batch != 0:
        raise ValueError(
            f"generation_batch_size ({user_generation_batch}) must be divisible by the global batch size "
            f"({global_batch} = per_device_train_batch_size x processes), because every optimisation step takes an "
            "equal slice of the generation batch. Change generation_batch_size or use steps_per_generation."
        )


def completion_eos_ids(trainer) -> list[int]:
    """The token ids at which GRPOTrainer cuts a generated completion.

    trl >= 1.14: ``trainer.eos_token_ids`` (tokenizer EOS plus the model's generation-config EOS ids);
    trl <= 1.13: the tokenizer's ``eos_token_id`` only.
    """
    ids = getattr(trainer, "eos_token_ids", None)
    return list(ids) if ids else [trainer._tokenizer.eos_token_id]


@contextmanager
def constrained_generate(model: torch.nn.Module, logits_processor_factory: Callable[[], object]) -> Iterator[None]:
    """Make ``model.generate`` receive an extra logits processor while the context is open.

    GRPOTrainer's transformers path (1.12–1.16) generates with
    ``accelerator.unwrap_model(self.model_wrapped).generate(**inputs, generation_config=self.generation_config)``
    and offers no argument for logits processors. Rather than re-implementing that path (padding, multimodal
    fields, DeepSpeed ZeRO-3 parameter gathering, FSDP summoning, EOS cutting, all of which drift between
    releases), the call is wrapped: inside the context, `model` (pass that same unwrapped object) carries an
    instance-level ``generate`` that appends a fresh processor from `logits_processor_factory` to any
    ``logits_processor`` list of the call. The instance attribute is removed on exit, even on error.

    Args:
        model: the object on which TRL calls ``generate`` (``accelerator.unwrap_model(trainer.model_wrapped)``;
            a PEFT model forwards ``logits_processor`` to its base model).
        logits_processor_factory: returns a new processor per ``generate`` call (trie processors are stateful).
    """
    from transformers import LogitsProcessorList

    if "generate" in vars(model):
        raise RuntimeError("model.generate is already patched (nested constrained_generate contexts?)")
    original = model.generate

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(logits_processor_factory())
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate
