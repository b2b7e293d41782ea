"""`trl-flower demo`: options and help, a --quick end-to-end run (report files, checkpoints), report formatting."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from trl_flower.cli import build_parser
from trl_flower.cli.demo import DemoArguments, format_summary, make_parser, table_columns


def parse(argv: list[str]) -> DemoArguments:
    (args,) = make_parser().parse_args_and_config(argv)
    return args


def test_help_explains_every_option():
    text = "".join(make_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for f in dataclasses.fields(DemoArguments):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert "".join(f.metadata["help"].split()) in text, f.name
    assert parse([]) == DemoArguments()  # no flags: DemoArguments' defaults
    assert "demo" in build_parser().format_help()  # listed by the top-level `trl-flower --help`


def test_options_are_parsed_with_their_types():
    args = parse(["--model", "/some/dir", "--num-items", "120", "--flow_lambda", "0.05", "--quick", "--max-steps", "7"])
    assert (args.model, args.num_items, args.flow_lambda, args.quick, args.max_steps) == (
        "/some/dir",
        48,  # --quick caps the catalogue at 48 items
        0.05,
        True,
        7,
    )


def test_invalid_option_is_one_line_exit_2(capsys):
    from trl_flower.cli.demo import main

    assert main(["--eval-split", "train"]) == 2
    assert capsys.readouterr().err == "trl-flower demo: error: --eval-split must be 'valid' or 'test', got 'train'\n"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eval_split="train"), "--eval-split must be 'valid' or 'test'"),
        (dict(flow_lambda=1.5), "--flow-lambda must lie in \\[0, 1\\]"),
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(num_threads=-1), "--num-threads must be >= 0"),
    ],
)
def test_invalid_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoArguments(**kwargs)


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    import os

    from trl_flower.cli.demo import auto_num_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert auto_num_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 0.0, 0.0))
    assert auto_num_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (7.9, 0.0, 0.0))
    assert auto_num_threads() == 1


def test_quick_shrinks_everything_but_keeps_explicit_budget():
    quick = DemoArguments(quick=True)
    assert quick.num_items <= 48 and quick.num_users <= 60 and quick.max_steps == 3 and quick.eval_rows == 12
    assert DemoArguments(quick=True, max_steps=5, eval_rows=4).max_steps == 5


def test_missing_model_directory_is_reported(tmp_path):
    from trl_flower.cli.demo import run_demo

    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        run_demo(DemoArguments(quick=True, model=str(tmp_path / "nope"), output_dir=str(tmp_path / "out")))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `trl-flower demo --quick` run through the real command line (about 30 s on 2 CPU cores)."""
    from trl_flower.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    return out


def test_quick_run_writes_the_report(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    methods = ["Most popular", "SFT (λ = 0)", "Flower (λ = 0.005)"]
    assert list(report["results"]) == methods and list(report["group_shares"]) == methods
    q = report["reference_shares"]
    assert len(q) == 8 and math.isclose(sum(q), 1.0, abs_tol=1e-9)
    K = report["settings"]["top_k"]
    for name, m in report["results"].items():
        for key in (f"HR@{K}", f"NDCG@{K}", f"DGU@{K}", f"MGU@{K}", "H", "TTR"):
            assert math.isfinite(m[key]), (name, key)
        assert 0.0 <= m[f"NDCG@{K}"] <= m[f"HR@{K}"] <= 1.0
        assert m["invalid"] == 0  # constrained beam search only returns catalogue titles
        assert m["num_users"] == report["data"]["eval_rows"] == 12
        assert math.isclose(sum(report["group_shares"][name]), 1.0, abs_tol=1e-9)
        # MGU is the mean absolute distance of the group shares from the data's
        mgu = sum(abs(p - r) for p, r in zip(report["group_shares"][name], q)) / 8
        assert math.isclose(m[f"MGU@{K}"], mgu, abs_tol=1e-9)
    assert report["results"]["Most popular"]["distinct_titles"] == K
    assert report["command"] == f"trl-flower demo --quick --output-dir {quick_run}"
    assert report["wall_time_s"]["total"] > 0
    md = (quick_run / "report.md").read_text()
    assert "| metric | Most popular | SFT (λ = 0) | Flower (λ = 0.005) |" in md and "group_shares.png" in md
    png = (quick_run / "group_shares.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_quick_run_saves_two_flower_checkpoints(quick_run):
    """sft/ and flower/ are plain HF model directories with the tree: usable by evaluation and the chains."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_flower import checkpoint

    models = {}
    for name in ("sft", "flower"):
        path = quick_run / name
        assert checkpoint.has_tree(path) and checkpoint.read_record(path)["flow_lambda"] == (
            0.0 if name == "sft" else 0.005
        )
        assert "## Flower settings" in checkpoint.model_card_path(path).read_text()
        AutoTokenizer.from_pretrained(path)
        models[name] = AutoModelForCausalLM.from_pretrained(path)
        assert checkpoint.load_tree(path).num_items == 48
    init = AutoModelForCausalLM.from_pretrained(quick_run / "init")
    sft, flower, start = (m.state_dict() for m in (models["sft"], models["flower"], init))
    assert any(not torch.equal(sft[k], start[k]) for k in start)  # both trained from the shared init ...
    assert any(not torch.equal(sft[k], flower[k]) for k in sft)  # ... and the flow term changes the result


def test_summary_table_columns():
    results = {
        "SFT": {
            "HR@5": 0.5,
            "NDCG@5": 0.25,
            "DGU@5": 0.1,
            "MGU@5": 0.05,
            "distinct_titles": 3,
            "H": 1.0,
            "TTR": 0.5,
            "invalid": 0,
        }
    }
    assert table_columns(5, results) == ["HR@5", "NDCG@5", "DGU@5", "MGU@5", "distinct_titles", "H", "TTR", "invalid"]
    report = {
        "title": "t",
        "settings": {"top_k": 5},
        "results": results,
        "group_shares": {"SFT": [0.7, 0.3]},
        "reference_shares": [0.6, 0.4],
        "files": {"markdown": "r.md", "json": "r.json"},
        "checkpoints": {"sft": "a", "flower": "b"},
        "wall_time_s": {"total": 12.3},
    }
    lines = format_summary(report).splitlines()
    assert "| HR@5 | 0.5000 |" in lines and "| distinct_titles | 3 |" in lines
    assert "| data (train histories) | 0.600 | 0.400 |" in lines and "| SFT | 0.700 | 0.300 |" in lines
    assert lines[-1] == "Wall time: 12 s"
