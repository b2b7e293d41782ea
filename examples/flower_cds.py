# Copyright the trl-flower authors. Apache-2.0.
"""Flower on Amazon CDs_and_Vinyl (paper Table 2): train, evaluate with constrained beam search, save the checkpoint.

GPUs (the paper's setting, recipe in examples/recipes/flower_cds.yaml: Qwen2.5-1.5B-Instruct, λ = 0.005, lr 3e-4,
global batch 128 = per-device 4 × accumulation 4 × 8 GPUs, 7 epochs, bf16):

    accelerate launch --config_file examples/accelerate/zero2.yaml --num_processes 8 examples/flower_cds.py \\
        --config examples/recipes/flower_cds.yaml

CPU smoke run (2 processes, ZeRO-3, a tiny model built from the catalogue text; docs/distributed.md):

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/flower_cds.py \\
        --config examples/recipes/flower_cds.yaml --build_tiny_model --bf16 false \\
        --max_train_rows 64 --max_steps 2 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \\
        --eval_rows 8 --output_dir outputs/flower-cds-tiny

The saved directory (`<output_dir>/checkpoint-final`) is a plain Hugging Face model directory (plus the prefix tree
and flower_config.json) that `examples/dpo_from_flower.py` and `examples/rloo_from_flower.py` start from.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

FINAL_DIR = "checkpoint-final"
TINY_DIR = "tiny-init"


@dataclass
class ScriptArguments:
    """Data, evaluation and tiny-model arguments of the CDs experiment (training arguments: `FlowerConfig`)."""

    dataset_name: str = field(
        default="CDs_and_Vinyl",
        metadata={"help": "Dataset directory name under <data_root>/amazon/ (or a path to a dataset directory)."},
    )
    data_root: str | None = field(
        default=None, metadata={"help": "Data root; default $TRL_FLOWER_DATA, else ../shared/data."}
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (CPU smoke runs). Default: all rows."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on after training (valid or test)."})
    eval_rows: int = field(
        default=-1, metadata={"help": "Evaluate on the first N rows of eval_split; -1 = all, 0 = skip evaluation."}
    )
    eval_top_k: int = field(default=10, metadata={"help": "K of the top-K lists (the paper reports @5 and @10)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per constrained beam-search call."})
    build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "Ignore model_name_or_path; build a tiny random Qwen2 (byte-level BPE trained on the catalogue "
            "and prompt text) in <output_dir>/tiny-init and train it. For CPU runs and tests without the hub."
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of the tiny model (--build_tiny_model)."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Layers of the tiny model (--build_tiny_model)."})
    tiny_vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary of the tiny model."})


def make_parser(subparsers: argparse._SubParsersAction | None = None):
    """The `TrlParser` over (ScriptArguments, FlowerConfig, ModelConfig); a subcommand parser if `subparsers`."""
    from trl import ModelConfig, TrlParser

    from trl_flower import FlowerConfig

    dataclass_types = (ScriptArguments, FlowerConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(
            "flower-cds", help="Train Flower on CDs_and_Vinyl", dataclass_types=dataclass_types
        )
    return TrlParser(dataclass_types)


def _log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[flower_cds] {message}", flush=True)


def build_tiny_model(script_args: ScriptArguments, data, out_dir: Path) -> Path:
    """Rank 0 builds the tiny model into `out_dir` (atomically); the other local ranks wait for it."""
    if (out_dir / "config.json").is_file():
        return out_dir
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from trl_flower.data.prompts import PromptBuilder
        from trl_flower.tiny import save_tiny_model

        builder = PromptBuilder.from_dataset(data.name)
        text = [builder.user_message(h) for h in data.splits["train"]["history_item_title"][:400]]
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        save_tiny_model(
            tmp,
            list(data.items) * 3 + text,
            vocab_size=script_args.tiny_vocab_size,
            hidden_size=script_args.tiny_hidden_size,
            num_layers=script_args.tiny_num_layers,
        )
        tmp.rename(out_dir)
    else:
        deadline = time.time() + 600
        while not (out_dir / "config.json").is_file():
            if time.time() > deadline:
                raise TimeoutError(f"rank 0 did not build the tiny model in {out_dir} within 10 minutes")
            time.sleep(0.5)
    return out_dir


def main(script_args: ScriptArguments, training_args, model_args) -> dict:
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from trl_flower import FlowerTrainer
    from trl_flower.data import load_amazon
    from trl_flower.data.popularity import history_item_counts, popularity_from_histories
    from trl_flower.data.prompts import PromptBuilder, check_prompt_tokenization
    from trl_flower.distributed import finish_distributed
    from trl_flower.tree import PrefixTree

    start = time.time()
    data = load_amazon(script_args.dataset_name, data_root=script_args.data_root)
    train_split = data.splits["train"]
    if script_args.max_train_rows is not None:
        train_split = train_split.select(range(min(script_args.max_train_rows, train_split.num_rows)))
    # Rewards and popularity groups always come from the full training split (the catalogue's statistics).
    full_train = data.splits["train"]
    counts = history_item_counts(full_train["history_item_id"], data.num_items)  # [M] R(i)
    popularity = popularity_from_histories(full_train["history_item_title"])
    _log(f"{data.name}: {data.num_items} items, {train_split.num_rows} training rows")

    model_path = model_args.model_name_or_path
    if script_args.build_tiny_model:
        model_path = str(build_tiny_model(script_args, data, Path(training_args.output_dir) / TINY_DIR))
        _log(f"tiny model: {model_path}")
    if model_path is None:
        raise ValueError("set --model_name_or_path (a hub id or a local model directory) or --build_tiny_model")
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left", revision=model_args.model_revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    builder = PromptBuilder.from_dataset(data.name, mode="chat", tokenizer=tokenizer)
    check_prompt_tokenization(
        tokenizer, [builder(h) for h in train_split["history_item_title"][:3]], data.items, tokenizer.eos_token_id
    )
    eval_tree = PrefixTree.from_titles(data.items, tokenizer)
    # Flower's outcome reward: interaction counts in training histories, +1 so that every item stays reachable.
    train_tree = eval_tree.with_rewards(counts.astype(np.float64) + 1.0)
    # Decoding never needs more than the longest item path (title tokens + terminator).
    training_args.max_completion_length = int(train_tree.item_length.max())
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        **({"dtype": model_args.dtype} if model_args.dtype else {}),
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    train_ds = train_split.map(
        lambda batch: {"prompt": [builder(h) for h in batch["history_item_title"]]},
        batched=True,
        remove_columns=["history_item_id", "history_item_title", "item_title"],
        desc="prompts",
    )

    trainer = FlowerTrainer(
        model=model_path,
        tree=train_tree,
        args=training_args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        item_groups=popularity.item_groups(data.items),
        peft_config=get_peft_config(model_args),
    )
    result = trainer.train()
    final_dir = Path(training_args.output_dir) / FINAL_DIR
    trainer.save_model(str(final_dir))  # ZeRO-3: 16-bit weights gathered on save (zero3_save_16bit_model)
    train_time = time.time() - start
    _log(f"trained {result.global_step} steps in {train_time:.1f} s; checkpoint: {final_dir}")

    report = {"checkpoint": str(final_dir), "train": result.metrics, "train_wall_s": round(train_time, 1)}
    if trainer.is_world_process_zero() and script_args.eval_rows != 0:
        # Evaluate the *saved* checkpoint in one process: it checks that the directory loads as a plain model, and
        # constrained beam search must not run on ZeRO-3-partitioned parameters.
        from trl_flower.evaluation.metrics import recommendation_metrics
        from trl_flower.evaluation.recommend import recommend

        split = data.splits[script_args.eval_split]
        if script_args.eval_rows > 0:
            split = split.select(range(min(script_args.eval_rows, split.num_rows)))
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained enters zero.Init, a collective the other ranks never join
        model = AutoModelForCausalLM.from_pretrained(final_dir, dtype="auto").to(trainer.accelerator.device).eval()
        prompts = [builder(h) for h in split["history_item_title"]]
        top_k = script_args.eval_top_k
        rec = recommend(
            model,
            tokenizer,
            prompts,
            eval_tree,
            top_k=top_k,
            batch_size=script_args.eval_batch_size,
            titles=data.items,
            show_progress=False,
        )
        ks = tuple(k for k in (1, 5, 10) if k <= top_k)
        metrics = recommendation_metrics(
            rec.titles, split["item_title"], popularity, data.items, ks=ks, fairness_ks=(top_k,)
        )
        report["eval"] = {"split": script_args.eval_split, "rows": split.num_rows, **metrics}
        (final_dir / "eval_results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        _log(
            "eval "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report["eval"].items())
        )
    trainer.accelerator.wait_for_everyone()
    finish_distributed()
    return report


def parse_args(argv: list[str] | None = None):
    """Parse the command line (and `--config` recipe) after repairing a multi-process CPU launch.

    `FlowerConfig.__post_init__` builds the distributed state, so `prepare_cpu_distributed` runs first and its
    settings (e.g. ``accelerator_config={"use_configured_state": True}`` under DeepSpeed) become parser defaults.
    """
    from trl_flower.distributed import prepare_cpu_distributed

    parser = make_parser()
    parser.set_defaults(**prepare_cpu_distributed({}))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args()[:3]
    main(script_args, training_args, model_args)
