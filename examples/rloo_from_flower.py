# Copyright the trl-flower authors. Apache-2.0.
"""RLOO from a Flower checkpoint: policy init = KL reference = the Flower model, reward = the Flower prefix tree.

The reward is the checkpoint's own `PrefixTreeRewardModel` (item popularity flows saved with the run), so a
completion that is not a catalogue title earns nothing; `beta > 0` keeps the policy close to the Flower model (TRL
rebuilds the reference from the policy's path). Sampling is TRL's, unconstrained.

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/rloo_from_flower.py \\
        --flower_checkpoint outputs/flower-cds-tiny --max_train_rows 16 --max_steps 2 \\
        --per_device_train_batch_size 4 --num_generations 4 --beta 0.04 --bf16 false --output_dir outputs/rloo-tiny

The trainer is TRL's stock `RLOOTrainer` (not one of trl-flower's methods: `trl-flower train --method rloo` is the
paper's SASRec-reward RLOO with trie-constrained rollouts); it is trained and saved through
`trl_flower.run.finish_run`, like every run. PPO (trl 1.11/1.12 only): `trl_flower.chain.make_ppo_trainer`
(docs/chaining.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ScriptArguments:
    """Where the Flower checkpoint and the data are (training arguments: `trl.RLOOConfig`)."""

    flower_checkpoint: str = field(
        default=None, metadata={"help": "The Flower run's directory (examples/flower_cds.py's output_dir)."}
    )
    dataset_name: str = field(default="CDs_and_Vinyl", metadata={"help": "Dataset under <data_root>/amazon/."})
    data_root: str | None = field(default=None, metadata={"help": "Default $TRL_FLOWER_DATA, else ../shared/data."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    """The `TrlParser` over (ScriptArguments, RLOOConfig)."""
    from trl import RLOOConfig, TrlParser

    if subparsers is not None:
        return subparsers.add_parser(
            "rloo-from-flower", help="RLOO from a Flower checkpoint", dataclass_types=(ScriptArguments, RLOOConfig)
        )
    return TrlParser((ScriptArguments, RLOOConfig))


def main(script_args: ScriptArguments, training_args) -> str:
    from transformers import AutoTokenizer
    from trl import RLOOTrainer

    from trl_flower.checkpoint import load_tree
    from trl_flower.data import load_amazon
    from trl_flower.data.prompts import PromptBuilder
    from trl_flower.distributed import finish_distributed
    from trl_flower.rewards import PrefixTreeRewardModel
    from trl_flower.run import finish_run

    checkpoint = Path(script_args.flower_checkpoint or "")
    tree = load_tree(checkpoint) if checkpoint.is_dir() else None
    if tree is None:
        raise FileNotFoundError(f"--flower_checkpoint {checkpoint} has no prefix tree: pass a saved trl-flower run")
    data = load_amazon(script_args.dataset_name, data_root=script_args.data_root, splits=("train",))
    split = data.splits["train"]
    if script_args.max_train_rows is not None:
        split = split.select(range(min(script_args.max_train_rows, split.num_rows)))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    builder = PromptBuilder.from_dataset(data.name, mode="chat", tokenizer=tokenizer)
    train_ds = split.map(
        lambda b: {"prompt": [builder(h) for h in b["history_item_title"]]},
        batched=True,
        remove_columns=split.column_names,
        desc="prompts",
    )
    reward = PrefixTreeRewardModel(tree)
    trainer = RLOOTrainer(
        model=str(checkpoint),
        reward_funcs=[reward],
        args=training_args,
        train_dataset=train_ds,
        processing_class=tokenizer,
    )
    out = Path(training_args.output_dir)
    finish_run(trainer, out, tokenizer=tokenizer, tree=tree, method="rloo", dataset_name=data.name)
    finish_distributed()
    return str(out)


def parse_args(argv: list[str] | None = None):
    """Parse after `prepare_cpu_distributed` (the config's __post_init__ builds the distributed state)."""
    from trl_flower.distributed import prepare_cpu_distributed

    parser = make_parser()
    parser.set_defaults(**prepare_cpu_distributed({}))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    script_args, training_args = parse_args()[:2]
    main(script_args, training_args)
