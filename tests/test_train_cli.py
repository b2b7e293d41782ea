"""`trl-flower train` end to end on the tiny random Qwen2 of `conftest.py` and a tiny Amazon-format dataset."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trl_flower.cli import SUBCOMMANDS, build_parser
from trl_flower.cli.train import METHODS, TrainArguments, make_parser
from trl_flower.cli.train import main as train_main
from trl_flower.tree import PrefixTree

# two optimiser steps of 4 rows, one thread: tiny models are fastest single-threaded on a shared machine
FAST = [
    "--max-steps",
    "2",
    "--per-device-train-batch-size",
    "4",
    "--learning-rate",
    "1e-3",
    "--num-threads",
    "1",
    "--logging-steps",
    "1",
    "--no-progress",
    "--category",
    "items",
]


def cli(argv: list[str]) -> int:
    assert SUBCOMMANDS["train"] == "train"
    return train_main(make_parser().parse_args(argv))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_titles) -> Path:
    """Amazon-format splits over the tiny catalogue: 16 train rows (every title in some history)."""
    out = tmp_path_factory.mktemp("data") / "Tiny_Items"
    out.mkdir()
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(tiny_titles)))
    rng = np.random.default_rng(0)
    n = len(tiny_titles)
    rows = [(rng.integers(0, n, size=int(rng.integers(1, 4))).tolist(), int(rng.integers(0, n))) for _ in range(16)]
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


@pytest.mark.parametrize("method", ["sft", "ifair", "flower", "flower-offline", "sdpo"])
def test_train_end_to_end(method, tiny_model_dir, dataset_dir, tmp_path, tiny_titles):
    out = tmp_path / method
    extra = ["--flow-lambda", "0.5"] if method.startswith("flower") else []
    if method == "flower-offline":
        method, extra = "flower", [*extra, "--offline-trajectory-prob", "1", "--offline-trajectory-prob-final", "0.5"]
    argv = [
        "--method",
        method,
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset_dir),
        "--output-dir",
        str(out),
        *FAST,
        *extra,
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli(argv) == 0
    assert f"wrote {out}" in stdout.getvalue()
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    tree = PrefixTree.load(out / "prefix_tree.npz")
    assert tree.num_items == len(tiny_titles)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2  # training moved the weights


def test_errors_are_one_line_exit_2(tiny_model_dir, dataset_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--data", str(dataset_dir), "--output-dir", str(tmp_path)]
    cases = [
        (["--method", "rloo", *base], "needs --sasrec-logits"),
        (["--method", "sft", "--flow-lambda", "0.1", *base], "only used by --method flower"),
        (["--method", "sft", "--offline-trajectory-prob", "0.5", *base], "only used by --method flower"),
        (
            ["--method", "sft", "--model", str(tmp_path), "--data", str(dataset_dir), "--output-dir", str(tmp_path)],
            "no config.json",
        ),
        (["--method", "flower", "--reward-variant", "div_s", *base], "needs --sasrec-logits"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_parser_lists_methods_and_every_option_has_help():
    parser = build_parser()
    text = parser.parse_args(["train", "--method", "sft", "--model", "m", "--data", "d", "--output-dir", "o"])
    assert text.func is train_main
    help_text = make_parser().format_help()
    for method in METHODS:
        assert method in help_text
    for f in fields(TrainArguments):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in help_text
