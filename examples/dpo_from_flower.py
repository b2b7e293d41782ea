# Copyright the trl-flower authors. Apache-2.0.
"""DPO from a Flower checkpoint (policy init = reference = the Flower model; the paper's "F-DPO" chain).

Preference pairs on CDs_and_Vinyl: prompt = the user's history (the same chat prompt Flower trained on), chosen =
the target item's title, rejected = a catalogue title drawn uniformly at random (seeded, never the target's title).

    python examples/dpo_from_flower.py --flower_checkpoint outputs/flower-cds/checkpoint-final \\
        --output_dir outputs/dpo-from-flower
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/dpo_from_flower.py \\
        --flower_checkpoint outputs/flower-cds-tiny/checkpoint-final --max_train_rows 32 --max_steps 2 \\
        --per_device_train_batch_size 2 --bf16 false --output_dir outputs/dpo-tiny

`DPOTrainer(model=<checkpoint dir>)` with no `ref_model` reloads the reference from the same path
(trl_flower.chain documents the other chains). The result is saved to `<output_dir>/checkpoint-final`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

FINAL_DIR = "checkpoint-final"


@dataclass
class ScriptArguments:
    """Where the Flower checkpoint and the data are (training arguments: `trl.DPOConfig`)."""

    flower_checkpoint: str = field(
        default=None, metadata={"help": "The Flower model directory (examples/flower_cds.py's checkpoint-final)."}
    )
    dataset_name: str = field(default="CDs_and_Vinyl", metadata={"help": "Dataset under <data_root>/amazon/."})
    data_root: str | None = field(default=None, metadata={"help": "Default $TRL_FLOWER_DATA, else ../shared/data."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    negative_seed: int = field(default=0, metadata={"help": "Seed of the random rejected titles."})


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    """The `TrlParser` over (ScriptArguments, DPOConfig)."""
    from trl import DPOConfig, TrlParser

    if subparsers is not None:
        return subparsers.add_parser(
            "dpo-from-flower", help="DPO from a Flower checkpoint", dataclass_types=(ScriptArguments, DPOConfig)
        )
    return TrlParser((ScriptArguments, DPOConfig))


def preference_dataset(data, split, builder, seed: int):
    """Conversational prompt / chosen / rejected rows (rejected: a random title different from the target's)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    items = data.items

    def rows(batch):
        out = {"prompt": [], "chosen": [], "rejected": []}
        for history, target in zip(batch["history_item_title"], batch["item_title"]):
            negative = target
            while negative == target:
                negative = items[int(rng.integers(len(items)))]
            out["prompt"].append([{"role": "user", "content": builder.user_message(history)}])
            out["chosen"].append([{"role": "assistant", "content": target}])
            out["rejected"].append([{"role": "assistant", "content": negative}])
        return out

    return split.map(rows, batched=True, remove_columns=split.column_names, desc="preference pairs")


def main(script_args: ScriptArguments, training_args) -> str:
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from trl_flower.data import load_amazon
    from trl_flower.data.prompts import PromptBuilder
    from trl_flower.distributed import finish_distributed

    checkpoint = Path(script_args.flower_checkpoint or "")
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--flower_checkpoint {checkpoint} is not a model directory (no config.json)")
    data = load_amazon(script_args.dataset_name, data_root=script_args.data_root, splits=("train",))
    split = data.splits["train"]
    if script_args.max_train_rows is not None:
        split = split.select(range(min(script_args.max_train_rows, split.num_rows)))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    builder = PromptBuilder.from_dataset(data.name, mode="chat", tokenizer=tokenizer)
    train_ds = preference_dataset(data, split, builder, script_args.negative_seed)

    # policy init = reference = the Flower checkpoint: TRL reloads the reference from the policy's path
    trainer = DPOTrainer(model=str(checkpoint), args=training_args, train_dataset=train_ds, processing_class=tokenizer)
    trainer.train()
    out = Path(training_args.output_dir) / FINAL_DIR
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        print(f"[dpo_from_flower] {trainer.state.global_step} steps from {checkpoint}; saved to {out}", flush=True)
    finish_distributed()
    return str(out)


def parse_args(argv: list[str] | None = None):
    """Parse after `prepare_cpu_distributed` (the config's __post_init__ builds the distributed state)."""
    from trl_flower.distributed import prepare_cpu_distributed

    parser = make_parser()
    parser.set_defaults(**prepare_cpu_distributed({}))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args = parse_args()[:2]
    main(script_args, training_args)
