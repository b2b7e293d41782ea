# Copyright the trl-flower authors. Apache-2.0.
"""Flower on Amazon CDs_and_Vinyl (paper Table 4): train through `trl-flower train`'s path, evaluate, save.

A thin script over `trl_flower.cli.train.run` (which builds the run with `trl_flower.run.train`): the same arguments
as `trl-flower train` plus a constrained beam-search evaluation of the saved model (its metrics go into
``eval_results.json`` and the model card) and an optional tiny model for CPU runs.

GPUs (the paper's setting, recipe in examples/recipes/flower_cds.yaml: Qwen2.5-1.5B-Instruct, div_s rewards with
SASRec scores, λ = 0.005, lr 3e-4, global batch 128 = per-device 4 × accumulation 4 × 8 GPUs, 7 epochs, bf16):

    trl-flower sasrec --data CDs_and_Vinyl --output_dir outputs/sasrec-cds
    accelerate launch --config_file examples/accelerate/zero2.yaml --num_processes 8 examples/flower_cds.py \\
        --config examples/recipes/flower_cds.yaml

CPU smoke run of the same recipe (2 processes, ZeRO-3, a tiny model built from the catalogue text, random stand-in
SASRec scores for the first 64 training rows; docs/distributed.md):

    python -c "import numpy as np; np.save('scores.npy', np.random.default_rng(0).normal(size=(64, 5841)))"
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/flower_cds.py \\
        --config examples/recipes/flower_cds.yaml --build_tiny_model --bf16 false --dtype float32 \\
        --preference_scores_path scores.npy --max_train_rows 64 --max_steps 2 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 1 --eval_rows 8 --output_dir outputs/flower-cds-tiny

The saved directory (``--output_dir``) is a plain Hugging Face model directory (plus the prefix tree, the Flower
record and a model card) that `examples/dpo_from_flower.py` and `examples/rloo_from_flower.py` start from.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl_flower.cli.train import TrainScriptArguments

TINY_DIR = "tiny-init"


@dataclass
class ScriptArguments(TrainScriptArguments):
    """`trl-flower train`'s script arguments plus the evaluation and the tiny model of this example."""

    eval_split: str = field(default="test", metadata={"help": "Split to evaluate the saved model on (valid or test)."})
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
    """The `TrlParser` over (ScriptArguments, FlowerConfig, ModelConfig), with Flower's defaults."""
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


def build_tiny_model(script_args: ScriptArguments, out_dir: Path) -> Path:
    """Rank 0 builds the tiny model into `out_dir` (atomically); the other local ranks wait for it."""
    if (out_dir / "config.json").is_file():
        return out_dir
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from trl_flower.data import load_amazon
        from trl_flower.data.prompts import PromptBuilder
        from trl_flower.tiny import save_tiny_model

        data = load_amazon(script_args.dataset_name, data_root=script_args.data_root, splits=("train",))
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


def evaluate_saved_run(script_args: ScriptArguments, out: Path) -> dict:
    """Constrained beam search of the saved model on `eval_split` (`trl-flower evaluate`'s library call,
    `trl_flower.evaluation.pipeline.run_evaluation`)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from trl_flower.evaluation.pipeline import EvaluateArguments, run_evaluation

    unset_hf_deepspeed_config()  # else from_pretrained enters zero.Init, a collective the other ranks never join
    result = run_evaluation(
        EvaluateArguments(
            model=str(out),
            data=script_args.dataset_name,
            data_root=script_args.data_root,
            split=script_args.eval_split,
            max_rows=max(script_args.eval_rows, 0),
            top_k=script_args.eval_top_k,
            batch_size=script_args.eval_batch_size,
            prompt_mode=script_args.prompt_mode,
            category=script_args.category,
            output_dir=str(out / "eval"),
            no_progress=True,
        )
    )
    return {"split": script_args.eval_split, **result["metrics"]}


def main(script_args: ScriptArguments, training_args, model_args) -> dict:
    """Train and save through `trl_flower.cli.train.run`, then evaluate the saved model on the main process."""
    from trl_flower.checkpoint import model_card_path
    from trl_flower.cli.train import run
    from trl_flower.distributed import finish_distributed
    from trl_flower.model_card import append_section, evaluation_section

    start = time.time()
    if script_args.build_tiny_model:
        model_args.model_name_or_path = str(build_tiny_model(script_args, Path(training_args.output_dir) / TINY_DIR))
        _log(f"tiny model: {model_args.model_name_or_path}")
    trained = run(script_args, training_args, model_args)
    out = trained.output_dir
    train_time = time.time() - start
    _log(f"trained {trained.trainer.state.global_step} steps in {train_time:.1f} s; saved to {out}")

    report = {"checkpoint": str(out), "train": trained.result.metrics, "train_wall_s": round(train_time, 1)}
    if trained.trainer.is_world_process_zero() and script_args.eval_rows != 0:
        # Evaluate the *saved* directory in one process: it checks that it loads as a plain model, and constrained
        # beam search must not run on ZeRO-3-partitioned parameters.
        report["eval"] = evaluate_saved_run(script_args, out)
        trained.trainer.save_metrics("eval", report["eval"])  # <output_dir>/eval_results.json, as HF scripts do
        section = evaluation_section(report["eval"], f"Evaluation ({script_args.eval_split})")
        append_section(model_card_path(out), section)
        _log("eval " + ", ".join(f"{k}={v:.4f}" for k, v in report["eval"].items() if isinstance(v, float)))
    trained.trainer.accelerator.wait_for_everyone()
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
