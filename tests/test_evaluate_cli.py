"""`trl-flower evaluate` end to end on the tiny random Qwen2 of `conftest.py`.

The dataset is written here in the Amazon splits format over the tiny catalogue (10 items, 9 distinct titles). The
model is random, so the tests check what holds for any model: every recommended title is a catalogue item, the files
hold the numbers the metrics functions give for the exported predictions, and errors are one line with exit 2.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest

from trl_flower import checkpoint
from trl_flower.cli.evaluate import main as evaluate_main
from trl_flower.cli.evaluate import make_parser
from trl_flower.data.popularity import popularity_from_histories
from trl_flower.evaluation.metrics import recommendation_metrics
from trl_flower.evaluation.pipeline import EvaluateArguments, command_line
from trl_flower.tree import PrefixTree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# K = 5 < 9 distinct tiny titles; one thread: tiny models are fastest single-threaded on a shared machine.
FAST = ["--top-k", "5", "--num-threads", "1", "--no-progress"]


def cli(argv: list[str]) -> int:
    """`trl-flower evaluate ...` through this subcommand's own `main` (other subcommands are not imported)."""
    assert argv[0] == "evaluate"
    return evaluate_main(argv[1:])


def parsed(argv: list[str]) -> EvaluateArguments:
    (args,) = make_parser().parse_args_and_config(argv)
    return args


def write_split(path: Path, rows: list[tuple[list[int], int]], titles: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
        for history, target in rows:
            writer.writerow([json.dumps(history), json.dumps([titles[i] for i in history]), target, titles[target]])


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_titles) -> Path:
    """Amazon-format splits over the tiny catalogue: 40 train rows (every title in some history), 6 valid, 12 test."""
    out = tmp_path_factory.mktemp("data") / "Tiny_Items"
    out.mkdir()
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(tiny_titles)))
    rng = np.random.default_rng(0)
    n = len(tiny_titles)

    def rows(count: int) -> list[tuple[list[int], int]]:
        return [
            (rng.integers(0, n, size=int(rng.integers(1, 6))).tolist(), int(rng.integers(0, n))) for _ in range(count)
        ]

    train = rows(40)
    train[0] = (list(range(n)), 0)  # every title is in a training history: 9 distinct titles fill the 8 groups
    for name, split in (("train", train), ("valid", rows(6)), ("test", rows(12))):
        write_split(out / f"{name}.csv", split, tiny_titles)
    return out


@pytest.fixture(scope="module")
def recommend_run(tiny_model_dir, dataset_dir, tmp_path_factory):
    """One `evaluate` run (recommend task, official JSON), shared by the tests that read its files.

    Returns:
        (argv, output directory, captured stdout).
    """
    out = tmp_path_factory.mktemp("eval")
    argv = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset_dir),
        "--category",
        "items",
        "--max-rows",
        "10",
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
        "--export-official-json",
        "--rebuild-tree",  # the tiny model has no saved tree
        *FAST,
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli(argv) == 0
    return argv, out, stdout.getvalue()


def test_recommend_end_to_end(recommend_run, dataset_dir, tiny_titles):
    argv, out, stdout = recommend_run
    saved = json.loads((out / "metrics.json").read_text())
    label = Path(argv[2]).name
    metrics = saved["results"][label]

    # every recommended title is a catalogue item, 10 rows x K = 5, in test-file order
    predictions = json.loads((out / "predictions.json").read_text())
    test_rows = list(csv.DictReader((dataset_dir / "test.csv").open()))[:10]
    assert len(predictions) == 10
    for row, pred in zip(test_rows, predictions):
        assert len(pred["predict"]) == 5 and set(pred["predict"]) <= set(tiny_titles)
        assert len(set(pred["predict"])) == 5  # distinct titles ("Blue Train" ids 3 and 4 are one title)
        assert pred["output"] == row["item_title"]
        assert pred["predict_score"] == sorted(pred["predict_score"], reverse=True)
        assert pred["input"].endswith("### Response: \n")
        assert "The user has enjoyed the following itemss before: " in pred["input"]  # --category, official quirk

    # the metrics are recommendation_metrics of the exported predictions, with train-history popularity
    train = list(csv.DictReader((dataset_dir / "train.csv").open()))
    pop = popularity_from_histories([json.loads(r["history_item_title"]) for r in train])
    expected = recommendation_metrics(
        [p["predict"] for p in predictions],
        [p["output"] for p in predictions],
        pop,
        tiny_titles,
        ks=(1, 3, 5),
        fairness_ks=(5,),
    )
    assert {k: v for k, v in metrics.items() if k != "unfinished"} == pytest.approx(expected, nan_ok=True)
    assert metrics["invalid"] == 0 and metrics["unfinished"] == 0 and metrics["num_users"] == 10
    assert saved["reference_shares"] == pytest.approx(pop.shares.tolist())
    assert len(saved["group_shares"][label]) == 8 and sum(saved["group_shares"][label]) == pytest.approx(1.0)

    # the printed table is the one in metrics.md, and both show the metrics
    md = (out / "metrics.md").read_text()
    table = stdout.split("\n\nwrote ")[0].strip()
    assert table.startswith("| metric |") and table in md
    assert f"| HR@5 | {metrics['HR@5']:.4f} |" in table and "| invalid | 0 |" in table
    assert (out / "group_shares.png").read_bytes().startswith(PNG_SIGNATURE)

    # provenance: the command reproduces the settings; resolved values are recorded
    assert saved["command"].startswith("trl-flower evaluate --model ")
    assert parsed(shlex.split(saved["command"])[2:]) == parsed(argv[1:])
    settings = saved["settings"]
    resolved = (settings["num_beams"], settings["batch_size"], settings["num_rows"], settings["num_items"])
    assert resolved == (5, 4, 10, 10)
    assert settings["tree"] == "built from the catalogue titles" and settings["device"] == "cpu"
    assert saved["seed"] == 0 and saved["versions"]["torch"] and saved["wall_time_s"]["beam search"] > 0


def test_batch_size_does_not_change_the_lists(recommend_run, tmp_path):
    argv, out, _ = recommend_run
    one = list(argv)
    one[one.index("--batch-size") + 1] = "1"
    one[one.index("--output-dir") + 1] = str(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(one) == 0
    batched = json.loads((out / "predictions.json").read_text())
    single = json.loads((tmp_path / "predictions.json").read_text())
    assert [p["predict"] for p in single] == [p["predict"] for p in batched]


def test_decoder_generate_gives_the_lists_of_the_trie_decoder(recommend_run, tmp_path):
    """--decoder picks the beam-search engine; the default trie engine and generate return the same top-K lists."""
    argv, out, _ = recommend_run
    with_generate = list(argv)
    with_generate[with_generate.index("--output-dir") + 1] = str(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli([*with_generate, "--decoder", "generate"]) == 0
    trie = json.loads((out / "predictions.json").read_text())
    generate = json.loads((tmp_path / "predictions.json").read_text())
    assert [p["predict"] for p in generate] == [p["predict"] for p in trie]
    np.testing.assert_allclose([p["predict_score"] for p in generate], [p["predict_score"] for p in trie], atol=1e-5)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["settings"]["decoder"] == "generate" and "--decoder generate" in saved["command"]
    assert json.loads((out / "metrics.json").read_text())["settings"]["decoder"] == "trie"


def test_decoder_choices_are_the_recommenders():
    from trl_flower.evaluation.pipeline import DECODERS
    from trl_flower.evaluation.recommend import DECODERS as RECOMMEND_DECODERS

    assert DECODERS == RECOMMEND_DECODERS and EvaluateArguments(model="m").decoder == "trie"
    assert parsed(["--model", "m", "--decoder", "generate"]).decoder == "generate"
    with pytest.raises(SystemExit):  # argparse refuses another engine
        parsed(["--model", "m", "--decoder", "sampling"])


def test_saved_tree_in_model_dir(tiny_model_dir, dataset_dir, tiny_titles, tiny_tokenizer, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    base = [
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(dataset_dir),
        "--category",
        "items",
        "--max-rows",
        "3",
        *FAST,
    ]

    # a matching tree saved by the trainer is used (the Flower record names it)
    PrefixTree.from_titles(tiny_titles, tiny_tokenizer).save(model / "my_tree.npz")
    (model / checkpoint.RECORD_FILE).write_text(json.dumps({"tree_file": "my_tree.npz"}))
    assert cli([*base, "--output-dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["settings"]["tree"] == str(model / "my_tree.npz")

    # a tree of another catalogue is refused with the fix; --rebuild-tree builds one from the titles
    PrefixTree.from_titles(list(reversed(tiny_titles)), tiny_tokenizer).save(model / "my_tree.npz")
    capsys.readouterr()
    assert cli([*base, "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-flower evaluate: error: ") and err.count("\n") == 1  # --no-progress: no other output
    assert "does not match the catalogue" in err and "--rebuild-tree" in err
    PrefixTree.from_titles(tiny_titles[:5], tiny_tokenizer).save(model / "my_tree.npz")
    assert cli([*base, "--output-dir", str(tmp_path / "b")]) == 2
    assert "has 5 items but the catalogue has 10" in capsys.readouterr().err
    assert cli([*base, "--output-dir", str(tmp_path / "c"), "--rebuild-tree"]) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["settings"]["tree"].startswith("built")


def test_distribution_end_to_end(tiny_model_dir, tiny_titles, tmp_path, capsys):
    target = {t: float(10 * (i + 1)) for i, t in enumerate(dict.fromkeys(tiny_titles))}  # 9 distinct titles
    (tmp_path / "target.json").write_text(json.dumps(target))
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--task",
        "distribution",
        "--target",
        str(tmp_path / "target.json"),
        "--num-samples",
        "40",
        "--rebuild-tree",  # the tiny model has no saved tree
        "--batch-size",
        "16",
        "--num-threads",
        "1",
        "--no-progress",
    ]
    assert cli([*argv, "--output-dir", str(out)]) == 0
    assert "| title_KL(T\\|\\|R) |" in capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    label = tiny_model_dir.name
    metrics = saved["results"][label]
    generated = saved["item_frequencies"]["generated"][label]
    assert sum(generated.values()) == 40 and set(generated) <= set(target)  # constrained: only target titles
    assert metrics["num_generated"] == 40 and metrics["out_of_set"] == 0 and metrics["unfinished"] == 0
    assert 0 < metrics["title_JS"] <= np.log(2)
    assert saved["settings"]["prompt"].endswith("### Response:\n")
    assert (out / "item_frequency.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (out / "group_shares.png").exists()

    # the same seed draws the same samples
    assert cli([*argv, "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["item_frequencies"]["generated"][label]
    assert again == generated


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{missing}", "--data", "{data}"], "no such directory"),
        (["--model", "{data}", "--data", "{data}"], "no config.json"),
        (["--model", "{model}", "--data", "No_Such_Category", "--data-root", "{data}"], "not found"),
        (["--model", "{model}"], "needs --data"),
        (["--model", "{model}", "--task", "distribution"], "needs --target"),
        (
            ["--model", "{model}", "--task", "distribution", "--target", "nope.json", "--data-root", "{data}"],
            "no such file",
        ),
        (
            ["--model", "{model}", "--data", "{data}", "--rebuild-tree", "--top-k", "10"],
            "`top_k` must be an int in [1, 9]",
        ),
        (["--model", "{model}", "--data", "{data}"], "prefix_tree.npz not found"),  # no silent rebuild
        (["--model", "{model}", "--data", "{data}", "--num-beams", "2", "--top-k", "3"], "--num-beams must be >="),
        (["--model", "{model}", "--data", "{data}", "--temperature", "0"], "--temperature must be > 0"),
        (["--model", "{model}", "--data", "{data}", "--tree", "{missing}"], "no such file"),
        (
            ["--model", "{model}", "--task", "distribution", "--target", "t.json", "--decoder", "generate"],
            "drop --decoder",
        ),
    ],
)
def test_errors_are_one_line_with_exit_2(extra, message, tiny_model_dir, dataset_dir, tmp_path, capsys):
    paths = {"missing": str(tmp_path / "missing"), "data": str(dataset_dir), "model": str(tiny_model_dir)}
    argv = [
        "evaluate",
        *[a.format(**paths) for a in extra],
        "--category",
        "items",
        "--max-rows",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--num-threads",
        "1",
        "--no-progress",
    ]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-flower evaluate: error: ") and err.count("\n") == 1, err
    assert message in err


def test_help_explains_every_option(capsys):
    text = "".join(make_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for f in fields(EvaluateArguments):
        assert f"--{f.name}" in text and "--" + f.name.replace("_", "-") in text, f.name
        assert "".join(f.metadata["help"].split()) in text, f.name
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--num_beams" in capsys.readouterr().out


def test_command_line_round_trip():
    args = EvaluateArguments(
        model="m dir", data="Movies_and_TV", max_rows=500, length_penalty=0.0, export_official_json=True, batch_size=8
    )
    command = command_line(args)
    assert command == (
        "trl-flower evaluate --model 'm dir' --data Movies_and_TV --max-rows 500 --batch-size 8 "
        "--length-penalty 0.0 --export-official-json"
    )
    assert parsed(shlex.split(command)[2:]) == args  # the dashed flags of `command_line` are TrlParser aliases
    assert all(f.default is not MISSING or f.name == "model" for f in fields(EvaluateArguments))


def test_real_movies_rows_with_a_tokenizer_trained_on_the_titles(data_dir, tmp_path, capsys):
    """The 'Done when' check on 20 rows (bench/evaluate_movies.md runs it on 500): every title is a catalogue item.
    About 7 s: a 1024-token BPE trained on the 2,653 titles, a 32-wide random Qwen2, 20 rows x 10 beams."""
    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.tiny import save_tiny_model

    data = load_amazon("Movies_and_TV", data_root=data_dir, splits=("test",))
    prompts = [PromptBuilder.from_dataset("Movies_and_TV")(h) for h in data.splits["test"]["history_item_title"][:50]]
    model = save_tiny_model(tmp_path / "model", data.items + prompts, vocab_size=1024, hidden_size=32)
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--model",
        str(model),
        "--data",
        "Movies_and_TV",
        "--data-root",
        str(data_dir),
        "--max-rows",
        "20",
        "--output-dir",
        str(out),
        "--export-official-json",
        "--rebuild-tree",  # a model saved here, without a tree
        "--num-threads",
        "1",
        "--no-progress",
    ]
    assert cli(argv) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 20 and all(len(p["predict"]) == 10 for p in predictions)
    assert {t for p in predictions for t in p["predict"]} <= set(data.items)
    metrics = json.loads((out / "metrics.json").read_text())["results"]["model"]
    assert metrics["invalid"] == 0 and metrics["num_users"] == 20


def test_chat_mode_and_the_tokenisation_check_is_applied(
    tiny_model_dir, dataset_dir, tiny_titles, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    import trl_flower.data.prompts as prompts_module

    calls = []
    real_check = prompts_module.check_prompt_tokenization

    def recording_check(tokenizer, prompts, titles, terminator_id=None, **kwargs):
        calls.append((list(prompts), list(titles), terminator_id))
        return real_check(tokenizer, prompts, titles, terminator_id, **kwargs)

    monkeypatch.setattr(prompts_module, "check_prompt_tokenization", recording_check)
    out = tmp_path / "chat"
    argv = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset_dir),
        "--category",
        "items",
        "--max-rows",
        "3",
        "--prompt-mode",
        "chat",
        "--output-dir",
        str(out),
        "--export-official-json",
        "--rebuild-tree",  # the tiny model has no saved tree
        *FAST,
    ]
    assert cli(argv) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert all(
        p["input"].startswith("<|im_start|>user\n") and p["input"].endswith("<|im_start|>assistant\n")
        for p in predictions
    )
    assert all(set(p["predict"]) <= set(tiny_titles) for p in predictions)
    # checked: the first and last prompt against every catalogue title, with the tree's terminator (EOS)
    ((checked_prompts, checked_titles, terminator),) = calls
    assert checked_prompts == [predictions[0]["input"], predictions[-1]["input"]]
    assert checked_titles == tiny_titles and terminator == tiny_tokenizer.eos_token_id

    def failing_check(*args, **kwargs):
        raise ValueError("prompt and title tokenise differently together than apart for 3 of 18 pairs")

    monkeypatch.setattr(prompts_module, "check_prompt_tokenization", failing_check)
    capsys.readouterr()
    assert cli(argv) == 2
    assert capsys.readouterr().err == (
        "trl-flower evaluate: error: prompt and title tokenise differently together than apart for 3 of 18 pairs\n"
    )


def test_row_sample_seed_evaluates_a_random_sample(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "sample"
    argv = [
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(dataset_dir),
        "--category",
        "items",
        "--max-rows",
        "5",
        "--row-sample-seed",
        "3",
        "--output-dir",
        str(out),
        "--export-official-json",
        "--rebuild-tree",  # the tiny model has no saved tree
        *FAST,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(argv) == 0
    test_rows = list(csv.DictReader((dataset_dir / "test.csv").open()))
    chosen = np.sort(np.random.default_rng(3).choice(len(test_rows), size=5, replace=False))
    assert chosen.tolist() != list(range(5))  # the sample is not the prefix
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["output"] for p in predictions] == [test_rows[i]["item_title"] for i in chosen]
