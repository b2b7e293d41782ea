"""`trl-flower train`: fine-tune an LLM recommender with Flower or one of the paper's baselines.

Examples::

    trl-flower train --method sft --model Qwen2.5-1.5B --data CDs_and_Vinyl --output-dir runs/bigrec_cds
    trl-flower train --method flower --model runs/bigrec_cds --data CDs_and_Vinyl --flow-lambda 0.005 \\
        --output-dir runs/flower_cds
    trl-flower train --method ifair --model Qwen2.5-1.5B --data CDs_and_Vinyl --output-dir runs/ifair_cds
    trl-flower train --method sdpo --model runs/bigrec_cds --data CDs_and_Vinyl --output-dir runs/sdpo_cds

Methods (docs/baselines.md says which paper each follows and how it deviates):

* ``sft``: BIGRec, TRL ``SFTTrainer`` on the target's tree path (loss on the response only);
* ``ifair``: IFairLRS, the same with per-sample group weights (response-length normalised);
* ``flower``: ``FlowerTrainer``, (1 − λ)·SFT + λ·flow loss on trie-constrained samples; item rewards are the
  training-history interaction counts plus ``--reward-smoothing``;
* ``dpo``, ``sdpo``, ``dmpo``, ``rosepo``: TRL ``DPOTrainer`` with catalogue negatives
  (`trl_flower.baselines.preference.train_preference`), policy and reference from ``--model`` unless ``--ref-model``;
* ``rloo``, ``grpo``, ``ppo``: SASRec-reward online RL with trie-constrained rollouts (``--sasrec-logits`` = the
  training rows' SASRec logits; ``ppo`` needs trl 1.11/1.12).

Every run trains on the ``train`` split (prompts built from the histories as ``trl-flower evaluate`` builds them) and
saves the model, its tokenizer and ``prefix_tree.npz`` in ``--output-dir``, ready for ``trl-flower evaluate``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_flower.cli._args import add_dataclass_arguments, subcommand_parser, to_dataclass

SFT_METHODS = ("sft", "ifair")
PREFERENCE_METHODS = ("dpo", "sdpo", "dmpo", "rosepo")
ONLINE_METHODS = ("rloo", "grpo", "ppo")
METHODS = (*SFT_METHODS, "flower", *PREFERENCE_METHODS, *ONLINE_METHODS)
PROMPT_MODES = ("reference", "chat")


@dataclass
class TrainArguments:
    """Options of `trl-flower train` (each field's ``help`` is the command-line help)."""

    method: str = field(metadata={"help": "Training method.", "choices": METHODS})
    model: str = field(metadata={"help": "Local model directory to start from (weights, config and tokenizer)."})
    data: str = field(
        metadata={
            "help": "A category name under <data-root>/amazon/ (e.g. CDs_and_Vinyl) or a "
            "directory with items.tsv and train/valid/test.csv."
        }
    )
    output_dir: str = field(metadata={"help": "Where the trained model, tokenizer and prefix_tree.npz are saved."})
    data_root: str | None = field(
        default=None,
        metadata={"help": "Root holding amazon/<category>/ (default: $TRL_FLOWER_DATA, else ../shared/data)."},
    )
    max_rows: int = field(default=0, metadata={"help": "Train on the first N training rows only; 0 = all."})
    prompt_mode: str = field(
        default="reference",
        metadata={
            "help": "'reference': the paper's plain-text prompt. 'chat': the same text as a user message "
            "through the tokenizer's chat template.",
            "choices": PROMPT_MODES,
        },
    )
    category: str | None = field(
        default=None, metadata={"help": "Category words in the prompt (default: from the dataset name)."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate (default: the method's official value: sft/ifair 3e-4, "
            "DPO family 1e-6, flower FlowerConfig's default).",
            "type": float,
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs (default: the method's official value, e.g. 7 for sft/ifair).", "type": float},
    )
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps; -1 = use epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rows per device per micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimiser step."})
    flow_lambda: float = field(
        default=0.005, metadata={"help": "flower: weight λ of the flow loss, loss = (1 − λ)·SFT + λ·flow."}
    )
    flow_loss: str = field(
        default="flower_subtb",
        metadata={"help": "flower: flow-balance loss (flower_subtb, db, tb, full_distribution)."},
    )
    title_log_term: str = field(
        default="official",
        metadata={
            "help": "flower: termination target at a complete title passed on the way to "
            "a longer one: official (the e^-15 constant) or flow (its own R/F).",
            "choices": ("official", "flow"),
        },
    )
    flow_policy_support: str = field(
        default="vocabulary",
        metadata={
            "help": "flower: match the flow ratios with π over the whole vocabulary "
            "(official) or renormalised over the tree's children (tree).",
            "choices": ("vocabulary", "tree"),
        },
    )
    offline_trajectory_prob: float = field(
        default=0.0,
        metadata={
            "help": "flower: probability that a batch trains the flow loss on its target items "
            "(teacher-forced) instead of on-policy samples; 0 = always on-policy."
        },
    )
    offline_trajectory_prob_final: float | None = field(
        default=None,
        metadata={
            "help": "flower: if set, the offline probability moves linearly to this value over training.",
            "type": float,
        },
    )
    reward_variant: str = field(
        default="none",
        metadata={
            "help": "flower: personalisation of the rewards by SASRec scores (none, div_s, "
            "add_logs, exact); all but none need --sasrec-logits."
        },
    )
    reward_smoothing: float = field(
        default=1.0,
        metadata={
            "help": "flower: item reward R(i) = training-history count + this (keeps items "
            "that never occur reachable; 0 = raw counts)."
        },
    )
    sasrec_logits: str | None = field(
        default=None,
        metadata={
            "help": "SASRec logits of the training rows (.npy [train rows, items], from "
            "`trl-flower sasrec`: train_logits.npy): flower's personalised rewards and "
            "the rloo/grpo/ppo reward."
        },
    )
    ref_model: str | None = field(
        default=None, metadata={"help": "DPO family / online RL: the frozen reference policy (default: --model)."}
    )
    num_negatives: int | None = field(
        default=None,
        metadata={"help": "DPO family: negatives per row (default: dpo/rosepo 1, sdpo/dmpo 3).", "type": int},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation order, shuffling and sampling."})
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 mixed precision (GPU)."})
    num_threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = torch's default."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N optimiser steps."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers`` (or build a standalone parser) with one option per field."""
    kwargs = dict(
        description=textwrap.fill(
            "Fine-tune a local causal LM as a recommender on an Amazon-format dataset with Flower or a baseline "
            "(BIGRec SFT, IFairLRS, DPO/S-DPO/DMPO/RosePO, RLOO/GRPO/PPO with a SASRec reward), and save it for "
            "`trl-flower evaluate`.",
            width=100,
        ),
        epilog="examples:\n" + __doc__.split("Examples::\n\n")[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser = subcommand_parser(subparsers, "train", "fine-tune with Flower or a baseline", **kwargs)
    add_dataclass_arguments(parser, TrainArguments)
    parser.set_defaults(func=main)
    return parser


def check_arguments(args: TrainArguments) -> None:
    """Cheap checks before anything is loaded; each error names the option and the fix."""
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
    if not (Path(args.model).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: no config.json; pass a local Hugging Face model directory")
    if args.prompt_mode not in PROMPT_MODES:
        raise ValueError(f"--prompt-mode must be one of {PROMPT_MODES}, got {args.prompt_mode!r}")
    if args.max_rows < 0 or args.num_threads < 0:
        raise ValueError("--max-rows and --num-threads must be >= 0")
    if args.sasrec_logits is not None and not Path(args.sasrec_logits).is_file():
        raise FileNotFoundError(f"--sasrec-logits {args.sasrec_logits}: no such file")
    needs_logits = args.method in ONLINE_METHODS or (args.method == "flower" and args.reward_variant != "none")
    if needs_logits and args.sasrec_logits is None:
        raise ValueError(
            f"--method {args.method} (reward variant {args.reward_variant!r}) needs --sasrec-logits "
            "(train_logits.npy of `trl-flower sasrec`)"
        )
    if args.ref_model is not None and args.method not in (*PREFERENCE_METHODS, *ONLINE_METHODS):
        raise ValueError(f"--ref-model is only used by {PREFERENCE_METHODS + ONLINE_METHODS}; drop it")
    if args.num_negatives is not None and args.method not in PREFERENCE_METHODS:
        raise ValueError(f"--num-negatives is only used by {PREFERENCE_METHODS}; drop it")
    if args.method != "flower":
        for name, default in (
            ("flow_lambda", 0.005),
            ("flow_loss", "flower_subtb"),
            ("reward_variant", "none"),
            ("reward_smoothing", 1.0),
            ("title_log_term", "official"),
            ("flow_policy_support", "vocabulary"),
            ("offline_trajectory_prob", 0.0),
            ("offline_trajectory_prob_final", None),
        ):
            if getattr(args, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} is only used by --method flower; drop it")


def main(args: argparse.Namespace | TrainArguments) -> int:
    """Run the training; errors are printed as one line and give exit status 2."""
    args = to_dataclass(args, TrainArguments)
    try:
        check_arguments(args)
        out = run_training(args)
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        print(f"trl-flower train: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _common_config(args: TrainArguments) -> dict[str, Any]:
    config: dict[str, Any] = dict(
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=args.no_progress,
    )
    if args.learning_rate is not None:
        config["learning_rate"] = args.learning_rate
    if args.num_train_epochs is not None:
        config["num_train_epochs"] = args.num_train_epochs
    return config


def run_training(args: TrainArguments) -> Path:
    """Load the data and tokenizer, build prompts and the tree, train with the chosen method, save; return the dir."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.data.popularity import history_item_counts, popularity_from_histories
    from trl_flower.tree import PrefixTree

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    data = load_amazon(args.data, data_root=args.data_root, splits=("train",))
    rows = data.splits["train"]
    if args.max_rows:
        rows = rows.select(range(min(args.max_rows, rows.num_rows)))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    builder = (
        PromptBuilder(category=args.category, mode=args.prompt_mode, tokenizer=tokenizer)
        if args.category
        else PromptBuilder.from_dataset(data.name, mode=args.prompt_mode, tokenizer=tokenizer)
    )
    prompts = [builder(h) for h in rows["history_item_title"]]
    tree = PrefixTree.from_titles(data.items, tokenizer)
    out = Path(args.output_dir)
    config = _common_config(args)

    if args.method in SFT_METHODS:
        from trl_flower.baselines.sft import train_sft

        train_sft(
            args.method,
            args.model,
            prompts,
            rows["item_id"],
            out,
            tree=tree,
            tokenizer=tokenizer,
            histories=rows["history_item_title"],
            target_titles=rows["item_title"],
            add_special_tokens=args.prompt_mode == "reference",
            **config,
        )
        return out

    dataset = rows.add_column("prompt", prompts)
    if args.method == "flower":
        from trl_flower.config import FlowerConfig
        from trl_flower.trainer import FlowerTrainer

        counts = history_item_counts(rows["history_item_id"], data.num_items)  # [M]
        train_tree = tree.with_rewards(counts.astype(np.float64) + args.reward_smoothing)
        popularity = popularity_from_histories(rows["history_item_title"])
        flower_args = FlowerConfig(
            output_dir=str(out),
            flow_lambda=args.flow_lambda,
            flow_loss=args.flow_loss,
            title_log_term=args.title_log_term,
            flow_policy_support=args.flow_policy_support,
            offline_trajectory_prob=args.offline_trajectory_prob,
            offline_trajectory_prob_final=args.offline_trajectory_prob_final,
            reward_variant=args.reward_variant,
            preference_scores_path=args.sasrec_logits,
            max_completion_length=int(tree.item_length.max()),
            **config,
        )
        trainer = FlowerTrainer(
            model=args.model,
            tree=train_tree,
            args=flower_args,
            train_dataset=dataset.select_columns(["prompt", "item_id", "row_index"]),
            processing_class=tokenizer,
            item_groups=popularity.item_groups(data.items),
        )
        trainer.train()
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        return out

    preference = _preference_module()
    if args.method in PREFERENCE_METHODS:
        preference.train_preference(
            args.method,
            args.model,
            args.ref_model,
            dataset,
            out,
            tree=tree,
            tokenizer=tokenizer,
            num_negatives=args.num_negatives,
            **config,
        )
    else:
        scores = np.load(args.sasrec_logits, mmap_mode="r")
        preference.train_online_rl(
            args.method, args.model, args.ref_model, dataset, out, preference_scores=scores, tree=tree, **config
        )
    return out


def _preference_module():
    """`trl_flower.baselines.preference` (the DPO family and online RL), or an ImportError naming what is available."""
    try:
        from trl_flower.baselines import preference
    except ModuleNotFoundError as err:
        if err.name != "trl_flower.baselines.preference":
            raise
        raise ImportError(
            "the DPO-family and online RL methods are not available in this build "
            f"(trl_flower.baselines.preference is missing); available: {SFT_METHODS + ('flower',)}"
        ) from None
    return preference


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
