# Copyright the trl-flower authors. Apache-2.0.
"""DPO from a Flower checkpoint (policy init = reference = the Flower model; the paper's "F-DPO" chain).

`trl-flower train --method dpo` with the Flower run as the model: preference rows on CDs_and_Vinyl whose prompt is the
user's history (the prompt mode the Flower run trained with, `--prompt_mode`), chosen = the target item's token path
in the prefix tree, rejected = a uniformly drawn other title (seeded). TRL's `DPOTrainer` (via
`trl_flower.baselines.preference`) reloads the reference from the same directory. Every `trl-flower train` option
applies (`DPOConfig`'s included); `--flower_checkpoint` is `--model_name_or_path`.

    python examples/dpo_from_flower.py --flower_checkpoint outputs/flower-cds --output_dir outputs/dpo-from-flower
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/dpo_from_flower.py \\
        --flower_checkpoint outputs/flower-cds-tiny --max_train_rows 32 --max_steps 2 \\
        --per_device_train_batch_size 2 --bf16 false --output_dir outputs/dpo-tiny

The result is a saved run in `--output_dir` (model, tokenizer, prefix tree, model card).
"""

from __future__ import annotations

import sys


def command_line(argv: list[str]) -> list[str]:
    """The `trl-flower train` arguments of this example's command line (``--flower_checkpoint`` is the model)."""
    argv = ["--model_name_or_path" if a == "--flower_checkpoint" else a for a in argv]
    return ["--method", "dpo", "--dataset_name", "CDs_and_Vinyl", *argv]  # a later --dataset_name wins


def main(argv: list[str] | None = None) -> int:
    """Run `trl-flower train --method dpo` from the Flower checkpoint; returns the exit status."""
    from trl_flower.cli.train import main as train

    return train(command_line(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
