"""`trl-flower evaluate` under `accelerate launch` with 2 CPU processes writes what one process writes.

Each process decodes every second batch of the single-process run (`trl_flower.evaluation.sharding`), so every
prompt is decoded in the same batch with the same padding: the gathered lists and scores are bit-identical, and so
are the metrics and the official predictions file. Part of the distributed group (``bash
scripts/run_distributed_tests.sh .venv``); kept out of the fast suite (``slow``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_distributed import accelerate_cmd, run  # the group's launch helpers (tests/ is on sys.path)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "trl_flower" / "__main__.py"  # `python -m trl_flower`, as a script accelerate can launch


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory, tiny_titles) -> Path:
    """Amazon-format splits over the tiny catalogue; 11 test rows of mixed history lengths (6 batches of 2)."""
    out = tmp_path_factory.mktemp("data") / "Tiny_Items"
    out.mkdir()
    (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(tiny_titles)))
    rng = np.random.default_rng(3)
    n = len(tiny_titles)
    for name, count in (("train", 30), ("valid", 4), ("test", 11)):
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            for i in range(count):
                history = list(range(n)) if (name, i) == ("train", 0) else rng.integers(0, n, size=1 + i % 5).tolist()
                target = int(rng.integers(0, n))
                titles = [tiny_titles[h] for h in history]
                writer.writerow([json.dumps(history), json.dumps(titles), target, tiny_titles[target]])
    return out


def evaluate(tmp: Path, name: str, config: str | None, model_dir: Path, data: Path) -> Path:
    out = tmp / name
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--category", "items", "--top-k", "4"]
    args += ["--batch-size", "2", "--num-threads", "1", "--no-progress", "--export-official-json"]
    args += ["--rebuild-tree"]  # the tiny model has no saved tree (refused without it since issue 22)
    args += ["--output-dir", str(out / "eval")]
    out.mkdir(parents=True)
    run(accelerate_cmd(config, MAIN, *args), out / "launch.log")
    return out / "eval"


def test_two_processes_write_the_single_process_metrics_and_predictions(tmp_path, tiny_model_dir, eval_dataset):
    single = evaluate(tmp_path, "single", None, tiny_model_dir, eval_dataset)
    double = evaluate(tmp_path, "ddp", "ddp", tiny_model_dir, eval_dataset)
    log = (tmp_path / "ddp" / "launch.log").read_text()
    # control: two processes really shared the 6 batches (3 each: 6 + 5 of the 11 prompts)
    assert "process 0/2: decoding 6 of 11 prompts" in log and "process 1/2: decoding 5 of 11 prompts" in log
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert two["results"] == one["results"]
    settings = [{k: v for k, v in run["settings"].items() if k != "output_dir"} for run in (one, two)]
    assert settings[0] == settings[1]  # every option and resolved value but where the files went
    assert two.get("group_shares") == one.get("group_shares")
    # the official predictions: titles and beam scores of every row, in order, byte for byte
    assert (double / "predictions.json").read_bytes() == (single / "predictions.json").read_bytes()
    rows = json.loads((single / "predictions.json").read_text())
    assert len(rows) == 11 and all(len(r["predict"]) == 4 for r in rows)
