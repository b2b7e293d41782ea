"""`trl-flower train` end to end on the tiny random Qwen2 of `conftest.py` and a tiny Amazon-format dataset.

The command is a TRL script (`TrlParser` over the script arguments, the method's config and `ModelConfig`), so the
tests check what that promises: every FlowerConfig field is a flag, recipes load, checkpoints are written and a run
resumed from one ends with the weights of the uninterrupted run, LoRA comes from ModelConfig, and a saved run has a
model card. Runs are 2 optimiser steps of 4 rows on one thread (tiny models are fastest single-threaded on a shared
machine).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trl_flower import checkpoint
from trl_flower.cli.train import METHODS, TrainScriptArguments, make_parser, parse_args
from trl_flower.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
NUM_TRAIN_ROWS = 16
FAST = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--learning_rate",
    "1e-3",
    "--num_threads",
    "1",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--category",
    "items",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_titles) -> Path:
    """Amazon-format splits over the tiny catalogue: 16 rows each (every title in some training history)."""
    out = tmp_path_factory.mktemp("data") / "Tiny_Items"
    out.mkdir()
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(tiny_titles)))
    rng = np.random.default_rng(0)
    n = len(tiny_titles)
    rows = [
        (rng.integers(0, n, size=int(rng.integers(1, 4))).tolist(), int(rng.integers(0, n)))
        for _ in range(NUM_TRAIN_ROWS)
    ]
    rows[0] = (list(range(n)), 0)
    for name in ("train", "valid", "test"):
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            for history, target in rows:
                writer.writerow(
                    [json.dumps(history), json.dumps([tiny_titles[i] for i in history]), target, tiny_titles[target]]
                )
    return out


@pytest.fixture(scope="module")
def scores(tmp_path_factory, tiny_titles) -> Path:
    """Stand-in SASRec logits of the training rows [16, 10] (personalised Flower rewards, the online RL reward)."""
    path = tmp_path_factory.mktemp("scores") / "train_logits.npy"
    np.save(path, np.random.default_rng(1).normal(size=(NUM_TRAIN_ROWS, len(tiny_titles))))
    return path


def base_argv(model_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out)]


def run(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_main(argv) == 0
    return stdout.getvalue()


def changed_weights(before: Path, after: Path) -> int:
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    return sum(not torch.equal(a[k], b[k]) for k in a if k in b)


@pytest.mark.parametrize("method", ["sft", "ifair", "flower", "flower-offline", "sdpo", "rloo"])
def test_train_end_to_end(method, tiny_model_dir, dataset_dir, scores, tmp_path, tiny_titles):
    out = tmp_path / method
    extra = {
        "flower": ["--flow_lambda", "0.5"],
        "flower-offline": [
            "--flow_lambda",
            "0.5",
            "--offline_trajectory_prob",
            "1",
            "--offline_trajectory_prob_final",
            "0.5",
        ],
        "rloo": ["--sasrec_logits", str(scores), "--num_generations", "2"],
    }.get(method, [])
    stdout = run(["--method", method.split("-")[0], *base_argv(tiny_model_dir, dataset_dir, out), *FAST, *extra])
    assert f"wrote {out}" in stdout
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert checkpoint.load_tree(out).num_items == len(tiny_titles)  # every method's run is evaluable
    assert changed_weights(tiny_model_dir, out) > 8  # training moved the weights (26 tensors in the tiny model)
    card = checkpoint.model_card_path(out).read_text()
    assert f"| `method` | {method.split('-')[0]} |" in card and "| `training rows` | 16 |" in card
    assert ("## Flower settings" in card) == method.startswith("flower")


def test_personalised_flower_rewards_from_the_config(tiny_model_dir, dataset_dir, scores, tmp_path):
    out = tmp_path / "div_s"
    argv = [*base_argv(tiny_model_dir, dataset_dir, out), *FAST, "--reward_variant", "div_s"]
    run([*argv, "--preference_scores_path", str(scores)])
    record = checkpoint.read_record(out)
    assert (record["reward_variant"], record["preference_scores_path"]) == ("div_s", str(scores))


def test_distilled_rewards_and_state_granularity_from_the_command_line(tiny_model_dir, dataset_dir, scores, tmp_path):
    out = tmp_path / "distill"
    argv = [*base_argv(tiny_model_dir, dataset_dir, out), *FAST, "--flow_lambda", "0.5", "--reward_variant", "distill"]
    argv += ["--preference_scores_path", str(scores), "--distill_alpha", "0.5", "--distill_beta", "2"]
    argv += ["--distill_top_n", "4", "--state_granularity", "2"]
    run(argv)
    record = checkpoint.read_record(out)
    assert record["reward_variant"] == "distill" and record["state_granularity"] == 2
    assert (record["distill"]["alpha"], record["distill"]["beta"], record["distill"]["top_n"]) == (0.5, 2.0, 4)
    assert changed_weights(tiny_model_dir, out) > 8


def test_recipes_parse_into_the_paper_settings():
    """Every recipe is a valid `trl-flower train` config: its keys are fields of the three dataclasses."""
    from trl_flower.config import FlowerConfig

    assert {r.name for r in RECIPES} == {"flower_cds.yaml", "flower_games.yaml", "flower_movies.yaml"}
    lambdas = {}
    for recipe in RECIPES:
        # bf16 is a GPU setting: on this CPU-only machine TrainingArguments would refuse it
        script_args, args, model_args = parse_args(["--config", str(recipe), "--bf16", "false"])
        assert isinstance(args, FlowerConfig) and script_args.method == "flower"
        assert model_args.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and model_args.dtype == "bfloat16"
        assert (args.learning_rate, args.warmup_steps, args.num_train_epochs, args.seed) == (3e-4, 20, 7, 42)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 128  # 8 GPUs
        assert args.reward_variant == "div_s" and args.preference_scores_path.endswith("train_logits.npy")
        assert str(args.save_strategy.value) == "epoch" and str(args.eval_strategy.value) == "no"  # pick on valid
        lambdas[script_args.dataset_name] = args.flow_lambda
    assert lambdas == {"CDs_and_Vinyl": 0.005, "Movies_and_TV": 0.005, "Video_Games": 0.0005}


def test_cds_recipe_on_cpu_with_a_tiny_stand_in(tiny_model_dir, dataset_dir, scores, tmp_path):
    """The paper's recipe with the model and the sizes overridden (tiny model, stand-in SASRec scores): one epoch of 2
    steps, a checkpoint per epoch, the div_s rewards, a saved run with its card."""
    out = tmp_path / "recipe"
    argv = ["--config", str(REPO / "examples" / "recipes" / "flower_cds.yaml"), "--bf16", "false", "--dtype", "float32"]
    argv += [*base_argv(tiny_model_dir, dataset_dir, out), "--category", "items", "--num_threads", "1"]
    argv += ["--preference_scores_path", str(scores), "--max_train_rows", "8"]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    run([*argv, "--disable_tqdm", "true"])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["epoch"] == 1.0  # the epoch checkpoint
    assert checkpoint.has_tree(out / "checkpoint-2") and checkpoint.read_record(out)["reward_variant"] == "div_s"
    assert checkpoint.read_record(out)["flow_lambda"] == 0.005  # the recipe's λ
    assert "## Flower settings" in checkpoint.model_card_path(out).read_text()


def test_evaluation_and_early_stopping_during_training(tiny_model_dir, dataset_dir, tmp_path):
    """--eval_strategy epoch on --dataset_test_split, the best checkpoint loaded, early stopping armed (popularity
    rewards: the validation rows need no scores)."""
    out = tmp_path / "eval"
    argv = [*base_argv(tiny_model_dir, dataset_dir, out), *FAST, "--max_train_rows", "8", "--max_eval_rows", "4"]
    argv += ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "true"]
    run([*argv, "--metric_for_best_model", "eval_loss", "--early_stopping_patience", "2"])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert len(evals) == 1 and np.isfinite(evals[0]["eval_loss"]) and evals[0]["eval_sampled/valid_share"] == 1.0
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    assert "| `evaluation rows` | 4 |" in checkpoint.model_card_path(out).read_text()


def test_resume_from_checkpoint_continues_to_the_same_weights(tiny_model_dir, dataset_dir, tmp_path):
    """An interrupted run (its output directory holds checkpoint-2 of 4 steps) resumed with --resume_from_checkpoint
    ends with the weights of the uninterrupted run, sampling included."""
    argv = [*FAST, "--flow_lambda", "0.5", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    straight = tmp_path / "straight"
    run([*base_argv(tiny_model_dir, dataset_dir, straight), *argv])
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-2", interrupted / "checkpoint-2")  # what a run killed after step 2 left
    run([*base_argv(tiny_model_dir, dataset_dir, interrupted), *argv, "--resume_from_checkpoint", "true"])
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    resumed_state = json.loads((interrupted / "checkpoint-4" / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == 4


def test_lora_from_the_command_line(tiny_model_dir, dataset_dir, tmp_path, tiny_titles):
    """--use_peft (TRL's ModelConfig): only the adapter trains; the saved adapter run is evaluable."""
    from trl_flower.cli.evaluate import main as evaluate_main

    out = tmp_path / "lora"
    lora = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    run([*base_argv(tiny_model_dir, dataset_dir, out), *FAST, "--flow_lambda", "0.5", *lora])
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").is_file()
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().max() > 0 for k in lora_b)  # lora_B starts at 0: the adapter trained
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert checkpoint.has_tree(out)
    evaluation = ["--model", str(out), "--data", str(dataset_dir), "--category", "items", "--max_rows", "3"]
    evaluation += ["--top_k", "3", "--num_threads", "1", "--no_progress", "--output_dir", str(tmp_path / "eval")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate_main(evaluation) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["tree"] == str(checkpoint.find_tree(out))  # decoded with the run's own tree


def test_every_flower_config_field_is_a_flag():
    """One definition: the command line has an option for every FlowerConfig and script field, with its help."""
    from trl_flower.config import FlowerConfig

    parser = make_parser(method="flower")
    options = {s for action in parser._actions for s in action.option_strings}
    for f in [*fields(FlowerConfig), *fields(TrainScriptArguments)]:
        if f.init:
            assert f"--{f.name}" in options, f.name
    help_text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    for f in fields(TrainScriptArguments):
        assert "".join(f.metadata["help"].split()) in help_text, f.name
    for method in METHODS:
        assert method in help_text


def test_each_method_parses_its_own_config_with_its_official_defaults():
    from trl import DPOConfig, RLOOConfig, SFTConfig

    common = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--bf16", "false"]
    _, sft, _ = parse_args(["--method", "sft", *common])
    assert isinstance(sft, SFTConfig) and (sft.learning_rate, sft.num_train_epochs) == (3e-4, 7)
    assert sft.completion_only_loss is True
    _, dpo, _ = parse_args(["--method", "sdpo", *common, "--learning_rate", "2e-6"])
    assert isinstance(dpo, DPOConfig) and (dpo.beta, dpo.learning_rate, dpo.per_device_train_batch_size) == (
        0.3,
        2e-6,
        1,
    )
    _, rloo, _ = parse_args(["--method", "rloo", *common])
    assert isinstance(rloo, RLOOConfig) and rloo.remove_unused_columns is False
    with pytest.raises(ValueError, match="--flow_lambda 0.1: not an option of method 'sft' .*SFTConfig"):
        parse_args(["--method", "sft", *common, "--flow_lambda", "0.1"])  # a Flower field is not an SFT option


def test_errors_are_one_line_exit_2(tiny_model_dir, dataset_dir, tmp_path, capsys):
    base = base_argv(tiny_model_dir, dataset_dir, tmp_path / "out")
    cases = [
        (["--method", "rloo", *base], "needs --sasrec_logits"),
        (["--method", "flower", *base, "--sasrec_logits", str(tmp_path)], "--preference_scores_path"),
        (["--method", "sft", *base, "--reward_smoothing", "2"], "only used by --method flower"),
        (["--method", "flower", *base, "--num_negatives", "2"], "only used by ('dpo'"),
        (["--model_name_or_path", str(tmp_path), "--dataset_name", str(dataset_dir)], "no config.json"),
        (["--model_name_or_path", str(tiny_model_dir)], "--dataset_name is required"),
        ([*base, "--early_stopping_patience", "2"], "--eval_strategy epoch"),
        ([*base, "--reward_variant", "div_s"], "preference_scores_path is not set"),
        (
            [*base, "--eval_strategy", "epoch", "--reward_variant", "div_s", "--preference_scores_path", "s.npy"],
            "the valid rows would look up their scores",
        ),
    ]
    for argv, message in cases:
        assert train_main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trl-flower train: error:")]
        assert len(errors) == 1 and message in errors[0], errors  # one line (library warnings may precede it)


@pytest.mark.trl112
def test_ppo_through_the_command_line(tiny_model_dir, dataset_dir, scores, tmp_path):
    """PPO (trl 1.11/1.12's experimental trainer) from the same command: constrained rollouts, SASRec reward."""
    out = tmp_path / "ppo"
    argv = ["--method", "ppo", *base_argv(tiny_model_dir, dataset_dir, out), "--sasrec_logits", str(scores)]
    argv += ["--category", "items", "--num_threads", "1", "--total_episodes", "4", "--per_device_train_batch_size", "4"]
    argv += ["--per_device_eval_batch_size", "2", "--num_mini_batches", "1", "--local_rollout_forward_batch_size", "4"]
    argv += ["--num_sample_generations", "0", "--learning_rate", "1e-3", "--gradient_checkpointing", "false"]
    run([*argv, "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"])
    assert checkpoint.has_tree(out) and changed_weights(tiny_model_dir, out) > 8
    assert "| `method` | ppo |" in checkpoint.model_card_path(out).read_text()
