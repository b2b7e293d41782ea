"""Tests for `FlowerConfig`: Flower's defaults, num_generations=1 batch bookkeeping, help == docstring, and the
construction-time errors (each must name the setting)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from trl import GRPOConfig

from trl_flower.config import FLOW_LOSSES, FlowerConfig

# a config never writes to output_dir
BASE = dict(output_dir="unused-flower-config-test")


def make(**kwargs) -> FlowerConfig:
    return FlowerConfig(**{**BASE, **kwargs})


class TestFlowerConfigDefaults:
    def test_flower_defaults(self):
        config = make()
        assert config.flow_lambda == 0.005  # the paper's λ for CDs and Movies
        assert config.flow_loss == "flower_subtb"
        assert config.subtb_lambda == 1.0
        assert config.nonterminal_log_term == -15.0
        assert config.reward_variant == "none" and config.preference_scores_path is None
        assert (config.item_id_column, config.row_index_column) == ("item_id", "row_index")
        assert config.tokenization_mode == "default"

    def test_sampling_and_training_defaults_differ_from_grpo(self):
        config, grpo = make(), GRPOConfig(**BASE, bf16=False)  # GRPOConfig's bf16 default fails on CPU
        assert config.num_generations == 1 and grpo.num_generations == 8
        assert config.temperature == 1.0 and config.beta == 0.0
        assert config.learning_rate == 3e-4 and grpo.learning_rate == 1e-6
        assert config.gradient_checkpointing is False
        assert config.report_to in ([], "none", ["none"])

    def test_bf16_is_off_on_a_cpu_only_machine(self):
        import torch

        if torch.cuda.is_available():
            pytest.skip("checks the CPU default")
        assert make().bf16 is False  # TRL's default (True) raises on a CPU-only machine
        assert make(use_cpu=True).bf16 is True  # CPU autocast is what use_cpu enables

    @pytest.mark.parametrize(
        "batch, accumulation, generation_kwargs, expected",
        [
            (1, 1, {}, (1, 1)),  # an odd generation batch of 1: GRPOConfig itself cannot accept num_generations=2
            (3, 3, {}, (9, 3)),
            (3, 1, {"steps_per_generation": 2}, (6, 2)),
            (3, 1, {"generation_batch_size": 9}, (9, 3)),
        ],
    )
    def test_one_generation_keeps_the_requested_generation_batch(
        self, batch, accumulation, generation_kwargs, expected
    ):
        config = make(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **generation_kwargs)
        assert config.num_generations == 1 and config.num_generations_eval is None
        assert (config.generation_batch_size, config.steps_per_generation) == expected

    def test_several_generations_use_grpo_checks(self):
        config = make(per_device_train_batch_size=4, num_generations=2)
        assert (config.num_generations, config.generation_batch_size) == (2, 4)
        with pytest.raises(ValueError, match="num_generations"):
            make(per_device_train_batch_size=3, num_generations=2)


def _docstring_entries(cls) -> dict[str, str]:
    """{name: description} of the `name (`type`, ...):` entries of a TRL-style config docstring, whitespace-joined."""
    entries, name = {}, None
    for line in cls.__doc__.splitlines():
        match = re.match(r"^ {8}(\w+) \(`.*`.*\):$", line)
        if match:
            name = match.group(1)
            entries[name] = []
        elif name and line.startswith(" " * 12):
            entries[name].append(line.strip())
        elif line.strip():
            name = None
    return {key: " ".join(value) for key, value in entries.items()}


def test_every_flower_field_has_help_equal_to_its_docstring_entry():
    own = FlowerConfig.__annotations__  # the fields declared (or re-declared) by FlowerConfig itself
    fields = {f.name: f for f in dataclasses.fields(FlowerConfig) if f.name in own}
    docs = _docstring_entries(FlowerConfig)
    assert set(fields) == set(docs), "every FlowerConfig field needs a docstring entry and vice versa"
    for name, field in fields.items():
        assert " ".join(field.metadata["help"].split()) == docs[name], f"help of {name!r} differs from its docstring"
        assert "%" not in field.metadata["help"], "argparse would choke on % in --help"


def test_cli_parsing():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(FlowerConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--flow_loss", "db", "--flow_lambda", "0.01", "--reward_variant", "none"]
    )
    assert (config.flow_loss, config.flow_lambda) == ("db", 0.01)
    with pytest.raises(SystemExit):  # argparse rejects values outside `choices`
        HfArgumentParser(FlowerConfig).parse_args_into_dataclasses(["--output_dir", "x", "--flow_loss", "nope"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flow_lambda": 1.5}, r"flow_lambda=1.5 is outside \[0, 1\]"),
        ({"flow_lambda": -0.1}, r"flow_lambda=-0.1 is outside \[0, 1\]"),
        ({"flow_lambda": float("nan")}, r"flow_lambda=nan is outside"),
        ({"flow_loss": "subtb"}, "flow_loss='subtb' is not one of"),
        ({"subtb_lambda": -1.0}, "subtb_lambda=-1.0 must be a finite number >= 0"),
        ({"nonterminal_log_term": float("-inf")}, "nonterminal_log_term=-inf must be a finite number < 0"),
        ({"nonterminal_log_term": 5.0}, "nonterminal_log_term=5.0 must be a finite number < 0"),
        ({"title_log_term": "exact"}, "title_log_term='exact' is not 'official' or 'flow'"),
        ({"reward_variant": "div"}, "reward_variant='div' is not one of"),
        ({"reward_variant": "div_s"}, "preference_scores_path is not set"),
        ({"preference_scores_path": "s.npy"}, "reward_variant='none' ignores it"),
        ({"tokenization_mode": "official"}, "tokenization_mode='official' is not one of"),
        ({"offline_trajectory_prob": 1.5}, "offline_trajectory_prob=1.5 is a probability"),
        ({"offline_trajectory_prob_final": -0.5}, "offline_trajectory_prob_final=-0.5 is a probability"),
        ({"offline_trajectory_prob": 1.0, "tokenization_mode": "reference"}, "offline trajectories teacher-force"),
        ({"use_vllm": True}, "use_vllm=True is not supported"),
        ({"use_transformers_continuous_batching": True}, "use_transformers_continuous_batching"),
        ({"beta": 0.04}, "beta=0.04 adds GRPO's KL penalty"),
        ({"num_iterations": 2}, "num_iterations=2 would reuse"),
        ({"num_generations": 0}, "num_generations=0 must be >= 1"),
        ({"per_device_train_batch_size": 2, "generation_batch_size": 3}, r"generation_batch_size \(3\) must be"),
    ],
)
def test_invalid_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_flow_losses_listed_in_help():
    help_text = next(f for f in dataclasses.fields(FlowerConfig) if f.name == "flow_loss").metadata["help"]
    assert all(f'"{name}"' in help_text for name in FLOW_LOSSES)
