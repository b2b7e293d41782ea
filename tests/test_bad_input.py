"""First run and bad input (issue 22): each fault of the issue's table is a clear, early error or a loud warning.

One test (or one parametrised group) per row, in the table's order; each asserts what the message names (the file,
column, item or setting) and that it happens where the information is first there (config, constructor, or before
anything is loaded). The rows the lead fixed on main are tested elsewhere: ``nonterminal_log_term > 0``
(tests/test_config.py), item rewards of 1e308 (tests/test_user_flows.py), the rq2 budget record
(tests/test_bench_rq2.py) and SASRec without a progress bar (tests/test_sasrec_oof.py).

Tiny pieces from conftest.py: the 10-title catalogue, its tokenizer and the random Qwen2 saved to disk.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Value

from trl_flower import FlowerConfig, FlowerTrainer, checkpoint
from trl_flower.cli.evaluate import main as evaluate_main
from trl_flower.cli.train import main as train_main
from trl_flower.data import load_amazon
from trl_flower.evaluation.pipeline import check_max_new_tokens
from trl_flower.run import RunData
from trl_flower.run import train as run_train
from trl_flower.trainer_checks import check_dataset, check_model_and_tree
from trl_flower.tree import PrefixTree

COUNTS = [5, 1, 9, 3, 3, 7, 2, 4, 6, 1]


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=COUNTS)


@pytest.fixture(scope="module")
def dataset(tiny_titles):
    prompt = "The user has enjoyed the following items before: Blue Train. Recommend the next item.\n"
    return Dataset.from_list([{"prompt": prompt, "item_id": (3 * i) % 10} for i in range(8)])


def config(out: Path, **kwargs) -> FlowerConfig:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,  # 2 steps over the 8 rows
        max_steps=2,
        max_completion_length=8,  # longest tiny title path: 7 tokens with the terminator
        flow_lambda=0.5,
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
        seed=0,
    )
    return FlowerConfig(**{**settings, **kwargs})


def write_dataset(out: Path, titles: list[str], rows: list[tuple[list[int], int]], train_rows: bool = True) -> Path:
    """An Amazon-format dataset directory (items.tsv and the three split CSVs; train.csv header only if not
    `train_rows`)."""
    out.mkdir(parents=True)
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(titles)))
    for split in ("train", "valid", "test"):
        with (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            for history, target in rows if (split != "train" or train_rows) else []:
                writer.writerow([json.dumps(history), json.dumps([titles[i] for i in history]), target, titles[target]])
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_titles) -> Path:
    """A dataset whose name ("Tiny_Items") has no known category words; every title is in the first history."""
    rows = [(list(range(10)), 0), ([1, 2], 3), ([4], 5), ([6, 7], 8)]
    return write_dataset(tmp_path_factory.mktemp("data") / "Tiny_Items", list(tiny_titles), rows)


def one_line_error(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------------------------------- row 1


def test_tokenizer_without_eos_is_refused_at_construction(
    tiny_model_dir, tiny_tokenizer, tiny_titles, dataset, tmp_path
):
    """Was: FlowerTrainer constructed, then train() failed in sampling.py ("Could not infer dtype of NoneType")."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    terminator = tokenizer.eos_token_id
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None
    tree = PrefixTree.from_titles(tiny_titles, tokenizer, terminator_id=terminator)  # the explicit terminator
    with pytest.raises(ValueError, match=r"no EOS token.*tokenizer.eos_token = tokenizer.convert_ids_to_tokens\(3\)"):
        FlowerTrainer(
            str(tiny_model_dir), tree, args=config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )


def test_eos_ids_with_none_are_refused_when_the_tokenizer_came_from_the_model(tree):
    """Without processing_class GRPOTrainer loads the tokenizer; its EOS ids [None, generation-config EOS] fail the
    model check that follows the load, before any sampling."""
    args = FlowerConfig("unused", max_completion_length=8)
    with pytest.raises(ValueError, match="no EOS token"):
        check_model_and_tree(args, tree, vocab_size=400, eos_ids=[None, tree.terminator_id])
    assert check_model_and_tree(args, tree, vocab_size=400, eos_ids=[tree.terminator_id]) is None


# ---------------------------------------------------------------------------------------------------- row 2


@pytest.mark.parametrize(
    "setting, value",
    [
        ("temperature", 0.0),
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("max_completion_length", 0),
        ("per_device_train_batch_size", 0),
        ("per_device_eval_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("generation_batch_size", 0),
        ("steps_per_generation", 0),
    ],
)
def test_sampling_and_batch_settings_are_checked_in_the_config(setting, value):
    """Was: accepted, and train() failed later with a transformers message (or trained nothing)."""
    with pytest.raises(ValueError, match=rf"^{setting}=(nan|-?[0-9.]+) must be (a finite number|an integer)"):
        FlowerConfig("unused", **{setting: value})


def test_valid_sampling_and_batch_settings_still_pass():
    args = FlowerConfig("unused", temperature=0.7, max_completion_length=1, per_device_train_batch_size=1)
    assert (args.temperature, args.max_completion_length, args.generation_batch_size) == (0.7, 1, 1)


# ---------------------------------------------------------------------------------------------------- row 4


def test_empty_training_dataset_is_refused_before_the_model_loads(tiny_model_dir, tree, dataset, tmp_path):
    """Was: 0 steps and `train_loss 0.0`."""
    empty = dataset.select([])
    with pytest.raises(ValueError, match="train_dataset has no rows"):
        FlowerTrainer(str(tiny_model_dir), tree, args=config(tmp_path), train_dataset=empty)
    with pytest.raises(ValueError, match=r"eval_dataset\['valid'\] has no rows"):
        FlowerTrainer(
            str(tiny_model_dir), tree, args=config(tmp_path), train_dataset=dataset, eval_dataset={"valid": empty}
        )


def test_fewer_rows_than_one_generation_batch_are_refused(tiny_model_dir, tree, dataset, tmp_path):
    """Found with the README's example (3 rows, default batch 8): incomplete generation batches are dropped, so
    train() failed with transformers' "args.max_steps must be set to a positive value"."""
    with pytest.raises(ValueError, match=r"train_dataset has 3 rows, fewer than the 4 prompts of one generation batch"):
        FlowerTrainer(str(tiny_model_dir), tree, args=config(tmp_path), train_dataset=dataset.select(range(3)))


def test_empty_training_rows_are_refused_by_every_method(tiny_model_dir, tiny_titles, tmp_path):
    """`trl_flower.run.train` is the one entry point of every method: SFT gets the same early error."""
    from trl import SFTConfig

    rows = Dataset.from_dict({"prompt": [], "item_id": [], "history_item_id": []})
    data = RunData(items=list(tiny_titles), train_dataset=rows)
    with pytest.raises(ValueError, match="data.train_dataset has no rows, so method 'sft' has nothing to train"):
        run_train("sft", tiny_model_dir, data, SFTConfig(output_dir=str(tmp_path), bf16=False))


# ---------------------------------------------------------------------------------------------------- row 5


def test_item_ids_written_as_text_name_the_column_and_the_fix(tree, dataset):
    """Was: numpy `UFuncTypeError` while formatting the error."""
    args = FlowerConfig("unused")
    as_text = dataset.cast_column("item_id", Value("string"))
    from trl_flower.rewards import PrefixTreeRewardModel

    reward = PrefixTreeRewardModel(tree)
    with pytest.raises(ValueError, match=r"train_dataset\['item_id'\] must hold integer item ids .* holds <U1 values"):
        check_dataset("train_dataset", as_text, args, tree, reward)
    with pytest.raises(
        ValueError, match=r"e\.g\. '0'\).*dataset\.cast_column\('item_id', datasets\.Value\('int64'\)\)"
    ):
        check_dataset("train_dataset", as_text, args, tree, reward)
    fixed = as_text.cast_column("item_id", Value("int64"))  # the fix the message gives works
    check_dataset("train_dataset", fixed, args, tree, reward)
    assert fixed["item_id"] == dataset["item_id"]


# ---------------------------------------------------------------------------------------------------- row 6


def test_from_titles_with_one_string_says_to_wrap_it_in_a_list(tiny_tokenizer):
    """Was: "item 4 has an empty or whitespace-only title" (the string was read character by character)."""
    with pytest.raises(TypeError, match=r"a single str 'Kind of Blue'; wrap it in a list: \['Kind of Blue'\]"):
        PrefixTree.from_titles("Kind of Blue", tiny_tokenizer)
    assert PrefixTree.from_titles(["Kind of Blue"], tiny_tokenizer).num_items == 1


# ---------------------------------------------------------------------------------------------------- rows 8-10


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tree, dataset, tmp_path_factory) -> Path:
    """A 2-step Flower run with checkpoints after steps 1 and 2 (the files transformers writes, plus Flower's)."""
    out = tmp_path_factory.mktemp("resume") / "out"
    FlowerTrainer(
        str(tiny_model_dir), tree, args=config(out, save_strategy="steps", save_steps=1), train_dataset=dataset
    ).train()
    return out


def damaged_copy(saved_run: Path, tmp_path: Path, name: str, damage) -> Path:
    """A copy of the run whose checkpoint-1 has `name` damaged by `damage(path)`; returns that checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(saved_run, out)
    damage(out / "checkpoint-1" / name)
    return out / "checkpoint-1"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", truncate, "is not a readable safetensors file"),
        ("trainer_state.json", truncate, "is not valid JSON"),
        ("optimizer.pt", garble, "is not a PyTorch state file"),  # was: PyTorch's advice to set weights_only=False
        ("optimizer.pt", truncate, "is not a PyTorch state file"),
        ("scheduler.pt", truncate, "is not a PyTorch state file"),
    ],
)
def test_damaged_checkpoint_files_are_named_before_anything_loads(saved_run, tmp_path, name, damage, message):
    """Was: upstream errors without the file name (safetensors, json) or with advice to load unsafely (torch)."""
    ckpt = damaged_copy(saved_run, tmp_path, name, damage)
    with pytest.raises(ValueError) as err:
        checkpoint.check_resume_checkpoint(ckpt)
    text = str(err.value)
    assert text.startswith(f"{ckpt / name} {message}")
    assert "Resume from another checkpoint of the run (checkpoint-2)" in text
    assert ("Do not load it with weights_only=False" in text) == name.endswith(".pt")


def test_resuming_from_a_damaged_checkpoint_fails_before_training(tiny_model_dir, tree, dataset, saved_run, tmp_path):
    ckpt = damaged_copy(saved_run, tmp_path, "model.safetensors", truncate)
    trainer = FlowerTrainer(str(tiny_model_dir), tree, args=config(tmp_path / "out"), train_dataset=dataset)
    with pytest.raises(ValueError, match=r"checkpoint-1/model.safetensors is not a readable safetensors file"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 0


def test_intact_checkpoint_passes_silently(saved_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.check_resume_checkpoint(saved_run / "checkpoint-1")


def test_resume_without_rng_state_warns_loudly(tiny_model_dir, tree, dataset, saved_run, tmp_path):
    """Was: silent, with different randomness (the resumed weights differed by 0.0044 at the end)."""
    ckpt = damaged_copy(saved_run, tmp_path, "rng_state.pth", Path.unlink)
    trainer = FlowerTrainer(str(tiny_model_dir), tree, args=config(tmp_path / "out"), train_dataset=dataset)
    with pytest.warns(UserWarning, match=r"rng_state.pth is missing: the run resumes from checkpoint-1 with fresh"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 2  # continuing is right: the run still finishes


def test_resume_true_without_checkpoints_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-<step> directory"):
        checkpoint.resume_checkpoint_dir(True, tmp_path)


# ---------------------------------------------------------------------------------------------------- rows 11-13


def evaluate(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate_main(argv)


def evaluate_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--category",
        "items",
        "--max-rows",
        "2",
        "--top-k",
        "3",
        "--num-threads",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_evaluate_without_a_saved_tree_fails_unless_asked_to_rebuild(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """Was: a tree silently rebuilt from the titles (only metrics.json's settings said so)."""
    assert not checkpoint.has_tree(tiny_model_dir)
    assert evaluate(evaluate_argv(tiny_model_dir, dataset_dir, tmp_path / "a")) == 2
    err = one_line_error(capsys, "trl-flower evaluate")
    assert f"{tiny_model_dir / 'prefix_tree.npz'} not found" in err and "--rebuild-tree" in err
    assert not (tmp_path / "a" / "metrics.json").exists()
    assert evaluate(evaluate_argv(tiny_model_dir, dataset_dir, tmp_path / "b", "--rebuild-tree")) == 0
    settings = json.loads((tmp_path / "b" / "metrics.json").read_text())["settings"]
    assert settings["tree"] == "built from the catalogue titles" and settings["rebuild_tree"] is True


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_text("not a tree"), "it is not an .npz archive"),
        (lambda p: np.savez(p, a=np.array([{"x": 1}], dtype=object)), "it holds pickled Python objects"),
        (lambda p: np.savez(p, weights=np.zeros(3)), "it lacks ['depth', 'first_child'"),
    ],
)
def test_a_file_that_is_not_a_tree_is_named(tmp_path, write, message):
    """Was: numpy's "This file contains pickled (object) data…" without the file name."""
    path = tmp_path / "prefix_tree.npz"
    write(path)
    with pytest.raises(ValueError) as err:
        PrefixTree.load(path)
    assert str(err.value).startswith(f"{path} is not a prefix tree saved by PrefixTree.save")
    assert message in str(err.value) and "--rebuild-tree" in str(err.value)


def test_evaluate_names_the_file_that_is_not_a_tree(tiny_model_dir, dataset_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "prefix_tree.npz").write_bytes(b"\x80\x04garbage")
    assert evaluate(evaluate_argv(model, dataset_dir, tmp_path / "out")) == 2
    err = one_line_error(capsys, "trl-flower evaluate")
    assert f"{model / 'prefix_tree.npz'} is not a prefix tree saved by PrefixTree.save" in err


def test_inconsistent_tree_arrays_are_refused(tree, tmp_path):
    path = tmp_path / "tree.npz"
    tree.save(path)
    arrays = dict(np.load(path))
    arrays["item_node"] = arrays["item_node"] + 1000
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"holds an inconsistent prefix tree \(array 'item_node' points outside"):
        PrefixTree.load(path)


def test_max_new_tokens_shorter_than_the_titles_is_an_error(tiny_model_dir, dataset_dir, tree, tmp_path, capsys):
    """Was: exit 0 with most lists invalid, metrics computed anyway, no warning."""
    longest = int(tree.item_length.max())
    cut = int((tree.item_length > 3).sum())
    with pytest.raises(ValueError, match=rf"--max-new-tokens 3 is shorter than the longest item path \({longest} "):
        check_max_new_tokens(3, tree)
    check_max_new_tokens(longest, tree)
    check_max_new_tokens(None, tree)
    argv = evaluate_argv(tiny_model_dir, dataset_dir, tmp_path / "out", "--rebuild-tree", "--max-new-tokens", "3")
    assert evaluate(argv) == 2
    err = one_line_error(capsys, "trl-flower evaluate")
    assert f"{cut} of 10 items" in err and f"set it to at least {longest}" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------- rows 14-15


def test_train_split_with_a_header_and_no_rows(tiny_titles, tiny_model_dir, tmp_path, capsys):
    """Was: SFT `IndexError: list index out of range`; Flower "0 titles cannot fill 8 popularity groups"."""
    data = write_dataset(tmp_path / "Movies_and_TV", list(tiny_titles), [([1], 2)], train_rows=False)
    with pytest.raises(ValueError, match=r"train.csv: a header but no rows. The training split needs at least one"):
        load_amazon(data)
    assert load_amazon(data, splits=("valid",)).splits["valid"].num_rows == 1  # other splits may be loaded alone
    for method in ("sft", "flower"):
        argv = ["--method", method, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data)]
        assert train_main([*argv, "--output_dir", str(tmp_path / method)]) == 2
        assert f"{data / 'train.csv'}: a header but no rows" in one_line_error(capsys, "trl-flower train")


def test_dataset_dir_without_category_words_asks_for_the_flag(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """Was: the hint said `Pass category='...'` (the Python argument), not `--category`."""
    argv = ["--model", str(tiny_model_dir), "--data", str(dataset_dir), "--output-dir", str(tmp_path)]
    assert evaluate(argv) == 2
    err = one_line_error(capsys, "trl-flower evaluate")
    assert f"--data {dataset_dir}:" in err and "not for 'Tiny_Items'" in err and "--category books" in err
    assert "category='" not in err
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(dataset_dir), "--output_dir", "o"]
    assert train_main(argv) == 2
    err = one_line_error(capsys, "trl-flower train")
    assert f"--dataset_name {dataset_dir}:" in err and "Pass --category" in err
