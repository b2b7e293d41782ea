"""What the baseline tests share: the tiny prompt, counts and CPU settings, and two saved runs to start from.

A Flower run (λ = 0.5) and its SFT twin (λ = 0), one FlowerTrainer step each on the conftest catalogue, saved as
plain Hugging Face directories with their trees: the policy inits and references of the DPO-family and online RL
tests (test_preference.py, test_online_rl.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trl_flower.tree import PrefixTree

PROMPT = "The user has enjoyed the following items before: {}. Recommend the next item.\n"
COUNTS = [5, 1, 9, 3, 3, 7, 2, 4, 6, 8]
TINY = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    max_steps=1,
    logging_steps=1,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    seed=0,
)


def save_checkpoint(out: Path, init_dir: Path, tokenizer, titles: list[str], flow_lambda: float) -> Path:
    """A 1-step FlowerTrainer run (λ = 0: the SFT twin), saved as a plain HF directory with its tree."""
    from datasets import Dataset

    from trl_flower.config import FlowerConfig
    from trl_flower.trainer import FlowerTrainer

    tree = PrefixTree.from_titles(titles, tokenizer, item_rewards=COUNTS)
    rows = Dataset.from_dict(
        {"prompt": [PROMPT.format(titles[(i + 1) % 10]) for i in range(4)], "item_id": [(i + 2) % 10 for i in range(4)]}
    )
    kw = {k: v for k, v in TINY.items() if k != "gradient_checkpointing"}
    kw["per_device_train_batch_size"] = 4
    args = FlowerConfig(str(out), flow_lambda=flow_lambda, max_completion_length=int(tree.item_length.max()), **kw)
    trainer = FlowerTrainer(model=str(init_dir), tree=tree, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    return out


def preference_rows(titles: list[str]):
    """Four training rows: prompt, target item id, history ids (RosePO) and row index (SASRec reward)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [PROMPT.format(", ".join(titles[i : i + 2])) for i in range(4)],
            "item_id": [2, 5, 7, 9],
            "history_item_id": [[i, i + 1] for i in range(4)],
            "row_index": [0, 1, 2, 3],
        }
    )


def params(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to check that training moved some."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}
