"""`trl-flower train`: fine-tune an LLM recommender with Flower or one of the paper's baselines, as a TRL script.

Examples::

    trl-flower train --config examples/recipes/flower_cds.yaml
    trl-flower train --config examples/recipes/flower_cds.yaml --resume_from_checkpoint true
    trl-flower train --method sft --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name CDs_and_Vinyl \\
        --output_dir runs/bigrec_cds
    trl-flower train --method flower --model_name_or_path runs/bigrec_cds --dataset_name CDs_and_Vinyl \\
        --flow_lambda 0.005 --use_peft --lora_r 16 --output_dir runs/flower_cds
    trl-flower train --method sdpo --model_name_or_path runs/bigrec_cds --dataset_name CDs_and_Vinyl \\
        --output_dir runs/sdpo_cds
    accelerate launch --config_file examples/accelerate/zero2.yaml -m trl_flower.cli train \\
        --config examples/recipes/flower_cds.yaml

The arguments are three dataclasses parsed by TRL's ``TrlParser`` (``--config recipe.yaml`` sets any of them; flags
override the recipe): the script arguments below (data, prompts, method), the method's TRL config (``FlowerConfig``
for ``flower``, ``SFTConfig`` for ``sft``/``ifair``, ``DPOConfig`` for the DPO family, ``GRPOConfig``/``RLOOConfig``
and ``PPOConfig`` for online RL; `trl_flower.run.config_class`), and TRL's ``ModelConfig`` (model, dtype, LoRA with
``--use_peft``). Every Flower setting is a ``FlowerConfig`` field, so a new field is a new flag. Training arguments
work as in any TRL script: ``--save_strategy``/``--save_steps`` write checkpoints, ``--resume_from_checkpoint <dir>``
(or ``true`` for the last one in ``--output_dir``) continues an interrupted run, ``--report_to``, ``--push_to_hub``.
``trl-flower train --method <method> --help`` lists that method's options.

Methods (docs/baselines.md says which paper each follows and how it deviates): ``sft`` (BIGRec), ``ifair``
(IFairLRS), ``flower`` (FlowerTrainer; item rewards = training-history interaction counts + ``--reward_smoothing``),
``dpo``/``sdpo``/``dmpo``/``rosepo`` (TRL ``DPOTrainer`` with catalogue negatives), ``rloo``/``grpo``/``ppo``
(SASRec-reward online RL with trie-constrained rollouts; ``--sasrec_logits``; ``ppo`` needs trl 1.11/1.12).

Every run trains on the ``train`` split (prompts built from the histories as ``trl-flower evaluate`` builds them)
through `trl_flower.run.train` and saves the model, its tokenizer, the prefix tree (and for Flower its record)
and a model card in ``--output_dir``, ready for ``trl-flower evaluate``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_flower.cli._parsing import HelpFormatter, report_error
from trl_flower.data.prompts import check_category

METHODS = ("sft", "ifair", "flower", "dpo", "sdpo", "dmpo", "rosepo", "rloo", "grpo", "ppo")  # = trl_flower.run
PROMPT_MODES = ("reference", "chat")


@dataclass
class TrainScriptArguments:
    """Script arguments of `trl-flower train` (the data and the method; training arguments: the method's config).

    Args:
        method: training method (one of :data:`METHODS`).
        dataset_name: a category under ``<data_root>/amazon/`` or a directory with the Amazon-format files.
        data_root: root holding ``amazon/<category>/``.
        max_train_rows: train on the first N training rows only.
        dataset_test_split: the split evaluated during training when ``eval_strategy`` is not ``"no"`` (Flower).
        max_eval_rows: evaluate on the first N rows of that split only.
        prompt_mode: ``"reference"`` or ``"chat"``.
        category: category words of the prompt.
        reward_smoothing: Flower's item reward R(i) = training-history count + this.
        sasrec_logits: RLOO / GRPO / PPO: the SASRec logits of the training rows (the reward).
        ref_model: DPO family / online RL: the frozen reference policy.
        num_negatives: DPO family: negatives per row.
        early_stopping_patience: Flower: evaluations without improvement before training stops.
        num_threads: CPU threads for torch.
    """

    method: str = field(
        default="flower",
        metadata={
            "help": "Training method: sft (BIGRec), ifair (IFairLRS), flower, dpo, sdpo, dmpo, rosepo, rloo, grpo or "
            "ppo. It selects the config class whose options apply (see --method <m> --help).",
            "choices": list(METHODS),
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A category name under <data_root>/amazon/ (e.g. CDs_and_Vinyl) or a directory with items.tsv "
            "and train/valid/test.csv."
        },
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "Root holding amazon/<category>/ (default: $TRL_FLOWER_DATA, else ../shared/data)."},
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Train on the first N training rows only (default: all)."}
    )
    dataset_test_split: str = field(
        default="valid",
        metadata={
            "help": "Split evaluated during training when --eval_strategy is not 'no' (method flower).",
            "choices": ["valid", "test"],
        },
    )
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N rows of --dataset_test_split only (default: all)."}
    )
    prompt_mode: str = field(
        default="reference",
        metadata={
            "help": "'reference': the paper's plain-text prompt. 'chat': the same text as a user message through the "
            "tokenizer's chat template (instruct models).",
            "choices": list(PROMPT_MODES),
        },
    )
    category: str | None = field(
        default=None, metadata={"help": "Category words in the prompt (default: from the dataset name)."}
    )
    reward_smoothing: float = field(
        default=1.0,
        metadata={
            "help": "flower: item reward R(i) = training-history interaction count + this (keeps items that never "
            "occur reachable; 0 = raw counts)."
        },
    )
    sasrec_logits: str | None = field(
        default=None,
        metadata={
            "help": "rloo/grpo/ppo: SASRec logits of the training rows (.npy [train rows, items], train_logits.npy of "
            "`trl-flower sasrec`), the reward. (Flower's personalised rewards read --preference_scores_path.)"
        },
    )
    ref_model: str | None = field(
        default=None,
        metadata={"help": "DPO family / online RL: the frozen reference policy (default: --model_name_or_path)."},
    )
    num_negatives: int | None = field(
        default=None, metadata={"help": "DPO family: negatives per row (default: dpo/rosepo 1, sdpo/dmpo 3)."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "flower: stop after this many evaluations without a better --metric_for_best_model (transformers' "
            "EarlyStoppingCallback; needs --eval_strategy and --load_best_model_at_end, as the official runs: 2)."
        },
    )
    num_threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = torch's default."})


def method_from_argv(argv: list[str]) -> str:
    """The ``--method`` of a command line, else the ``method`` of its ``--config`` recipe, else ``"flower"``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.method:
        return known.method
    if known.config and Path(known.config).is_file():
        import yaml

        recipe = yaml.safe_load(Path(known.config).read_text()) or {}
        if isinstance(recipe, dict) and recipe.get("method"):
            return str(recipe["method"])
    return "flower"


def make_parser(subparsers: argparse._SubParsersAction | None = None, method: str = "flower", prog: str | None = None):
    """The `TrlParser` over (TrainScriptArguments, the method's config, ModelConfig), with the method's defaults.

    Args:
        subparsers: register as the ``train`` subcommand of this parser (``parser_class=TrlParser``) instead.
        method: whose config class and official defaults to use (`trl_flower.run.config_class`, `method_defaults`).
        prog: the program name shown in the usage line.
    """
    from trl import ModelConfig, TrlParser

    from trl_flower.run import check_method, config_class, method_defaults

    check_method(method)
    dataclass_types = (TrainScriptArguments, config_class(method), ModelConfig)
    kwargs = dict(
        description=f"Fine-tune an LLM recommender with method {method!r} (a TRL script; --config recipe.yaml).",
        epilog="examples:\n" + __doc__.split("Examples::\n\n")[1].split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    if subparsers is not None:
        parser = subparsers.add_parser("train", help="fine-tune with Flower or a baseline", **kwargs)
    else:
        parser = TrlParser(dataclass_types, prog=prog or "trl-flower train", **kwargs)
    parser.set_defaults(**method_defaults(method))
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(script arguments, training config, ModelConfig) of a command line, after repairing a CPU multi-process launch.

    The method's config builds the distributed state in ``__post_init__``, so `prepare_cpu_distributed` runs before
    parsing and its settings become parser defaults.
    """
    from trl_flower.distributed import prepare_cpu_distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    method = method_from_argv(argv)
    parser = make_parser(method=method)
    parser.set_defaults(**prepare_cpu_distributed({}))
    *parsed, from_recipe, from_flags = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    unknown = [*from_recipe, *from_flags]
    if unknown:
        config = type(parsed[1]).__name__
        raise ValueError(
            f"{' '.join(unknown)}: not an option of method {method!r} (its training arguments are {config}'s); "
            f"drop it, or see `trl-flower train --method {method} --help`"
        )
    script_args, training_args, model_args = parsed
    return script_args, training_args, model_args


def check_arguments(script_args: TrainScriptArguments, training_args: Any, model_args: Any) -> None:
    """Cheap checks before anything is loaded; each error names the option and the fix."""
    from trl_flower.run import ONLINE_METHODS, PREFERENCE_METHODS, evaluates

    method = script_args.method
    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required: a category such as CDs_and_Vinyl or a dataset directory")
    model = model_args.model_name_or_path
    if model is None:
        raise ValueError("--model_name_or_path is required: a local model directory or a Hugging Face Hub id")
    if Path(model).expanduser().exists() and not (Path(model).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"--model_name_or_path {model}: no config.json in it; pass a Hugging Face model directory (for a LoRA "
            "run, its merged model) or a Hub id"
        )
    if script_args.num_threads < 0:
        raise ValueError(f"--num_threads must be >= 0 (0 = torch's default), got {script_args.num_threads}")
    if method in ONLINE_METHODS:
        if script_args.sasrec_logits is None:
            raise ValueError(f"--method {method} needs --sasrec_logits (train_logits.npy of `trl-flower sasrec`)")
    elif script_args.sasrec_logits is not None:
        hint = " (Flower's personalised rewards read --preference_scores_path)" if method == "flower" else ""
        raise ValueError(f"--sasrec_logits is only used by {ONLINE_METHODS}; drop it{hint}")
    if script_args.sasrec_logits is not None and not Path(script_args.sasrec_logits).is_file():
        raise FileNotFoundError(f"--sasrec_logits {script_args.sasrec_logits}: no such file")
    if script_args.ref_model is not None and method not in (*PREFERENCE_METHODS, *ONLINE_METHODS):
        raise ValueError(f"--ref_model is only used by {PREFERENCE_METHODS + ONLINE_METHODS}; drop it")
    if script_args.num_negatives is not None and method not in PREFERENCE_METHODS:
        raise ValueError(f"--num_negatives is only used by {PREFERENCE_METHODS}; drop it")
    if script_args.reward_smoothing != 1.0 and method != "flower":
        raise ValueError("--reward_smoothing is only used by --method flower; drop it")
    if method == "flower" and evaluates(training_args) and training_args.reward_variant != "none":
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy.value} with --reward_variant "
            f"{training_args.reward_variant}: the {script_args.dataset_test_split} rows would look up their scores "
            "in --preference_scores_path, the training rows' SASRec logits (row_index counts the rows of each "
            "split). Set --eval_strategy no and pick a checkpoint with `trl-flower evaluate --split valid`, or "
            "evaluate with --reward_variant none"
        )
    if script_args.early_stopping_patience is not None:
        if method != "flower":
            raise ValueError("--early_stopping_patience is only used by --method flower (the one that evaluates)")
        if not (evaluates(training_args) and training_args.load_best_model_at_end):
            raise ValueError(
                "--early_stopping_patience needs evaluations to compare: set --eval_strategy epoch (or steps) and "
                "--load_best_model_at_end true"
            )
    check_category(script_args.dataset_name, script_args.category, "--dataset_name")


def run(script_args: TrainScriptArguments, training_args: Any, model_args: Any):
    """Load the data and tokenizer, build the prompts, and train and save through `trl_flower.run.train`."""
    import torch
    from trl import get_peft_config

    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.run import evaluates, load_tokenizer, recommendation_data, train

    check_arguments(script_args, training_args, model_args)
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    method = script_args.method
    evaluating = method == "flower" and evaluates(training_args)
    splits = ("train", script_args.dataset_test_split) if evaluating else ("train",)
    data = load_amazon(script_args.dataset_name, data_root=script_args.data_root, splits=splits)
    model = model_args.model_name_or_path
    tokenizer = load_tokenizer(
        model,
        method,
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
    )
    mode = script_args.prompt_mode
    builder = (
        PromptBuilder(category=script_args.category, mode=mode, tokenizer=tokenizer)
        if script_args.category
        else PromptBuilder.from_dataset(data.name, mode=mode, tokenizer=tokenizer)
    )
    run_data = recommendation_data(
        data,
        builder,
        max_train_rows=script_args.max_train_rows,
        eval_split=script_args.dataset_test_split if evaluating else None,
        max_eval_rows=script_args.max_eval_rows,
    )
    if hasattr(training_args, "model_init_kwargs"):  # TRL loads the model from its path with these (as TRL's scripts)
        init = {"revision": model_args.model_revision, "dtype": model_args.dtype}
        if model_args.attn_implementation:
            init["attn_implementation"] = model_args.attn_implementation
        training_args.model_init_kwargs = {**init, **(training_args.model_init_kwargs or {})}
    callbacks = []
    if script_args.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=script_args.early_stopping_patience))
    return train(
        method,
        model,
        run_data,
        training_args,
        callbacks=callbacks,
        tokenizer=tokenizer,
        reward_smoothing=script_args.reward_smoothing,
        peft_config=get_peft_config(model_args),
        ref_model=script_args.ref_model,
        reward_scores=script_args.sasrec_logits,
        num_negatives=script_args.num_negatives,
        negative_seed=training_args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    """`trl-flower train`: parse, train, save; errors are printed as one line and give exit status 2."""
    from trl_flower.distributed import finish_distributed

    try:
        script_args, training_args, model_args = parse_args(argv)
        result = run(script_args, training_args, model_args)
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        return report_error("trl-flower train", err)
    if result.trainer.is_world_process_zero():
        print(f"wrote {result.output_dir}")
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
