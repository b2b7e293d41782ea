"""RQ3 of the Flower paper at CPU scale: is a Flower checkpoint a better reference policy than an SFT one?

Every method runs twice per seed on the same rows, steps, batch, learning rate, β and seed: once from the SFT
(BIGRec) checkpoint and once from the Flower checkpoint, the start being both the policy init and the frozen
reference (the paper's B_* and F_* rows). Every run is built by the library's entry point, `trl_flower.run.train`:

* ``dpo``, ``sdpo``, ``dmpo``, ``rosepo``: TRL ``DPOTrainer`` (`trl_flower.baselines.preference`), catalogue
  negatives sampled with the seed;
* ``rloo``: TRL ``RLOOTrainer`` (`trl_flower.baselines.online_rl`), trie-constrained rollouts, reward =
  min-max-normalised SASRec score of the sampled title, KL to the reference with ``beta``. RLOO is the on-policy
  stand-in for the paper's PPO, which exists only in trl 1.11/1.12 (the installed trl has none).

Every trained model and both starting checkpoints are decoded the same way (`trl-flower evaluate`'s library call,
`trl_flower.evaluation.pipeline.run_evaluation`: trie-constrained beam search, 10 beams, length penalty 1) on the
first ``--test-rows`` rows of ``--split`` and scored with the paper's metrics (NDCG@5, HR@5, DGU@10, MGU@10, H, TTR,
distinct titles).

Writes ``<--out>.json`` and ``<--out>.md`` (default ``bench/results/rq3_movies``). Trained checkpoints and per-model
reports go to ``--runs-dir``; a finished training or evaluation found there is reused.

Usage::

    python bench/rq3_reference.py --sft-checkpoint /tmp/rq2_runs/Movies_and_TV/seed0/sft \\
        --flower-checkpoint /tmp/rq2_runs/Movies_and_TV/seed0/flower \\
        --sasrec-logits /tmp/rq2_runs/Movies_and_TV/sasrec/train_logits.npy --seeds 0 1
    # a starting pair of your own (tiny Qwen2 from trl_flower.tiny, trained with methods sft and flower):
    python bench/rq3_reference.py --build-pair /tmp/rq3/pair --pair-rows 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import spine  # beside this script: the bench spine
from spine import RESULTS_DIR, logger, paper_numbers, use_this_checkout, versions

use_this_checkout()  # this checkout's trl_flower, also when another one is installed

DPO_FAMILY = ("dpo", "sdpo", "dmpo", "rosepo")
ALL_METHODS = (*DPO_FAMILY, "rloo")
STARTS = ("sft", "flower")
METRICS = ("NDCG@5", "HR@5", "DGU@10", "MGU@10", "H", "TTR", "distinct_titles")
HIGHER_IS_BETTER = {
    "NDCG@5": True,
    "HR@5": True,
    "DGU@10": False,
    "MGU@10": False,
    "H": True,
    "TTR": True,
    "distinct_titles": True,
}
# Flower paper, Table 4, Movies_and_TV (bench/paper/flower_table4.json): the two starting points at full scale
# (Qwen2.5-1.5B). The paper's RQ3 table itself is not in the project's reference notes (see the results file).
PAPER_MOVIES = {
    name: paper_numbers("flower_table4")["Movies_and_TV"][method]
    for name, method in (("BIGRec (SFT)", "BIGRec"), ("Flower", "Flower"))
}
METHOD_NAMES = {"dpo": "DPO", "sdpo": "S-DPO", "dmpo": "DMPO", "rosepo": "RosePO", "rloo": "RLOO (for PPO)"}


# ------------------------------------------------------------------------------------------------------ arguments


def make_parser() -> argparse.ArgumentParser:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sft-checkpoint", help="SFT (BIGRec) checkpoint: policy init and reference of the B_* runs")
    p.add_argument("--flower-checkpoint", help="Flower checkpoint: policy init and reference of the F_* runs")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, help="methods to run")
    p.add_argument("--dataset", default="Movies_and_TV", help="Amazon category under <data-root>/amazon/")
    p.add_argument("--data-root", default=None, help="root holding amazon/<category>/ (default: ../shared/data)")
    p.add_argument(
        "--train-rows",
        type=int,
        default=2000,
        help="random subsample of N training rows (subsample seed 0, the same for every run); 0 = all",
    )
    p.add_argument("--test-rows", type=int, default=500, help="first N rows of --split are evaluated; 0 = all")
    p.add_argument(
        "--row-sample-seed",
        type=int,
        default=None,
        help="with --test-rows: a random sample of N rows (this seed) instead of the first N",
    )
    p.add_argument("--split", default="test", choices=("test", "valid"), help="evaluation split (valid for choices)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of every method (the shared budget)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="training seeds (also the negative-sampling seed); the starting checkpoints are fixed",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="DPO family: rows per step; RLOO: completions per step (= batch / generations prompts)",
    )
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (linear decay), all methods")
    p.add_argument("--beta", type=float, default=0.3, help="DPO-family β (official 0.3)")
    p.add_argument("--rloo-beta", type=float, default=0.05, help="RLOO KL coefficient to the reference (> 0)")
    p.add_argument("--num-generations", type=int, default=4, help="RLOO completions per prompt")
    p.add_argument(
        "--sasrec-logits",
        default=None,
        help="SASRec logits of the training rows (train_logits.npy of `trl-flower sasrec`): RLOO reward",
    )
    p.add_argument("--runs-dir", default="/tmp/rq3_runs", help="trained checkpoints and per-model reports")
    p.add_argument(
        "--out",
        default=str(RESULTS_DIR / "rq3_movies"),
        help="results prefix: writes <out>.json and <out>.md",
    )
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per beam-search call")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores are shared with other jobs)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing new: write the results from the finished runs in --runs-dir "
        "(e.g. after running the seeds as separate processes)",
    )
    p.add_argument(
        "--build-pair",
        default=None,
        metavar="DIR",
        help="instead of the experiment: build a starting pair DIR/{init,sft,flower} (tiny Qwen2 trained with "
        "methods sft and flower) and exit",
    )
    p.add_argument("--pair-rows", type=int, default=4000, help="--build-pair: first N training rows")
    p.add_argument("--pair-epochs", type=float, default=1.0, help="--build-pair: epochs of both trainings")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fail before anything is loaded; each message names the option."""
    if args.build_pair:
        return
    for name in ("sft_checkpoint", "flower_checkpoint"):
        path = getattr(args, name)
        if path is None or not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--{name.replace('_', '-')} {path}: not a model directory (no config.json)")
    if "rloo" in args.methods and (args.sasrec_logits is None or not Path(args.sasrec_logits).is_file()):
        raise SystemExit("--methods rloo needs --sasrec-logits (the training rows' SASRec logits, .npy)")
    if args.steps <= 0 or args.batch_size <= 0:
        raise SystemExit("--steps and --batch-size must be > 0")
    if "rloo" in args.methods and args.batch_size % args.num_generations:
        raise SystemExit("--batch-size must be a multiple of --num-generations (RLOO groups completions per prompt)")


# ------------------------------------------------------------------------------------------------------ helpers


_log = logger("rq3")


def _versions() -> dict[str, str]:
    """Library versions and the git commit, for the results file."""
    return versions("trl_flower", "git_commit", "trl", "transformers", "torch", "numpy", "python")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _log_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last logged training values (loss, DPO reward margins/accuracies, RLOO reward/KL) for the report."""
    logs = [e for e in log_history if "loss" in e or "reward" in e]
    keys = ("loss", "rewards/accuracies", "rewards/margins", "reward", "kl")

    def pick(entry: dict[str, Any]) -> dict[str, float]:
        return {k: round(float(entry[k]), 4) for k in keys if k in entry}

    return {"first": pick(logs[0]), "last": pick(logs[-1])} if logs else {}


# ------------------------------------------------------------------------------------------------------ data


class Setup:
    """Data, the training subsample with prompts, history counts and the catalogue tree, shared by every run."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        from transformers import AutoTokenizer

        from trl_flower.data import PromptBuilder, load_amazon
        from trl_flower.data.popularity import history_item_counts
        from trl_flower.tree import PrefixTree

        self.data = load_amazon(args.dataset, data_root=args.data_root, splits=("train",))
        full = self.data.splits["train"]
        # RosePO's negatives ∝ counts in the *whole* train split's histories (the data's popularity), not the subsample
        self.counts = history_item_counts(full["history_item_id"], self.data.num_items)
        rows = full
        if 0 < args.train_rows < rows.num_rows:
            # a random (not the first, time-ordered) subsample, the same rows for every method, start and seed
            pick = np.sort(np.random.default_rng(0).choice(rows.num_rows, args.train_rows, replace=False))
            rows = rows.select(pick.tolist())
        # the paper's plain-text prompt (`trl-flower evaluate`'s default); it does not depend on the tokenizer
        builder = PromptBuilder.from_dataset(self.data.name, mode="reference")
        self.rows = rows.add_column("prompt", [builder(h) for h in rows["history_item_title"]])
        self.trees = {}
        for start, path in (("sft", args.sft_checkpoint), ("flower", args.flower_checkpoint)):
            tokenizer = AutoTokenizer.from_pretrained(path)
            self.trees[start] = PrefixTree.from_titles(self.data.items, tokenizer)  # EOS terminator, as evaluate


# ------------------------------------------------------------------------------------------------------ training


def _common_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Trainer arguments shared by every method: the same budget, schedule and seed."""
    return dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        seed=seed,
        data_seed=seed,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def train_one(
    setup: Setup, args: argparse.Namespace, method: str, start: str, init: str, seed: int, out: Path
) -> dict[str, Any]:
    """Train `method` from `init` (= reference) into `out` through `trl_flower.run.train`; returns wall time and log
    summary (cached)."""
    from trl_flower.run import RunData, config_class, method_defaults, train

    record_path = out / "rq3_train.json"
    cached = _read_json(record_path)
    if cached is not None:
        return cached
    tree = setup.trees[start]
    if method in DPO_FAMILY:
        columns, settings = ["prompt", "item_id", "history_item_id"], {"beta": args.beta}
    else:
        columns = ["prompt", "row_index"]
        settings = {
            "beta": args.rloo_beta,
            "num_generations": args.num_generations,
            "max_completion_length": int(tree.item_length.max()),  # every item path fits; none is cut
        }
    config = config_class(method)(
        output_dir=str(out), **{**method_defaults(method), **_common_config(args, seed), **settings}
    )
    data = RunData(
        items=setup.data.items,
        train_dataset=setup.rows.select_columns(columns),
        item_counts=setup.counts,  # RosePO's negatives ∝ the whole train split's counts, not the subsample's
        name=setup.data.name,
    )
    begin, cpu = time.perf_counter(), time.process_time()
    run = train(
        method,
        init,
        data,
        config,
        tree=tree,
        negative_seed=seed,  # DPO family: the negatives are drawn with the training seed
        reward_scores=args.sasrec_logits if method == "rloo" else None,  # [train rows, items] by row_index
    )  # saved into `out` with its tree and model card
    trainer = run.trainer
    # CPU time of this process ~ the wall time on an idle machine (1 torch thread); the machine is shared
    record = {
        "wall_s": round(time.perf_counter() - begin, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "steps": trainer.state.global_step,
        "log": _log_summary(trainer.state.log_history),
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluate(model_dir: str | Path, label: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`trl-flower evaluate`'s library call (`trl_flower.evaluation.pipeline.run_evaluation`) on the first
    ``--test-rows`` rows of ``--split`` (cached)."""
    from trl_flower.evaluation.pipeline import EvaluateArguments, run_evaluation

    cache = out / "result.json"
    cached = _read_json(cache)
    if cached is not None:
        return cached
    begin, cpu = time.perf_counter(), time.process_time()
    result = run_evaluation(
        EvaluateArguments(
            model=str(model_dir),
            data=args.dataset,
            data_root=args.data_root,
            split=args.split,
            max_rows=args.test_rows,
            row_sample_seed=args.row_sample_seed,
            batch_size=args.eval_batch_size,
            num_threads=args.threads,
            label=label,
            output_dir=str(out),
            no_progress=True,
        )
    )
    record = {
        "metrics": result["metrics"],
        "group_shares": list(result["group_shares"]),
        "wall_s": round(time.perf_counter() - begin, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    cache.write_text(json.dumps(record, indent=1))
    m = record["metrics"]
    _log(
        f"{label}: NDCG@5 {m['NDCG@5']:.4f} HR@5 {m['HR@5']:.4f} DGU@10 {m['DGU@10']:.3f} MGU@10 {m['MGU@10']:.4f} "
        f"distinct {m['distinct_titles']} ({record['wall_s']:.0f} s)"
    )
    return record


def run_tag(args: argparse.Namespace) -> str:
    """A short hash of everything a trained checkpoint depends on, so cached runs of other settings are not reused."""
    keys = (
        "sft_checkpoint",
        "flower_checkpoint",
        "dataset",
        "train_rows",
        "steps",
        "batch_size",
        "learning_rate",
        "beta",
        "rloo_beta",
        "num_generations",
        "sasrec_logits",
    )
    text = json.dumps(
        {
            k: str(Path(v).resolve()) if k.endswith(("checkpoint", "logits")) and v else v
            for k, v in vars(args).items()
            if k in keys
        },
        sort_keys=True,
    )
    return _short_hash(text)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate every (seed, method, start); returns the raw records."""
    root = Path(args.runs_dir) / run_tag(args)
    sample = "" if args.row_sample_seed is None else f"_sample{args.row_sample_seed}"
    runs = root / f"eval_{args.split}{args.test_rows}{sample}"  # cached evaluations are per row set
    inits = {"sft": args.sft_checkpoint, "flower": args.flower_checkpoint}
    records: dict[str, Any] = {"starts": {}, "runs": []}
    _log(f"runs in {root}")
    for start, path in inits.items():  # cached per checkpoint, shared by runs of other training settings
        where = Path(args.runs_dir) / "starts" / _short_hash(str(Path(path).resolve())) / runs.name
        records["starts"][start] = evaluate(path, f"{start} (start)", where, args)
    setup = Setup(args)
    for seed in args.seeds:
        for method in args.methods:
            for start in STARTS:
                name = f"seed{seed}/{method}_{start}"
                out = root / f"seed{seed}" / f"{method}_{start}"
                if args.report_only and not (runs / name / "result.json").is_file():
                    _log(f"{name}: not finished, left out of the report")
                    continue
                _log(f"training {name}")
                train = train_one(setup, args, method, start, inits[start], seed, out)
                _log(f"{name}: trained in {train['wall_s']:.0f} s, log {train['log']}")
                result = evaluate(out, f"{METHOD_NAMES[method]} from {start}, seed {seed}", runs / name, args)
                records["runs"].append({"seed": seed, "method": method, "start": start, "train": train, "eval": result})
    return records


# ------------------------------------------------------------------------------------------------------ report


def aggregate(records: dict[str, Any], methods: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and start: mean over seeds of every metric, the per-seed values, train/eval wall time."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        table[method] = {}
        for start in STARTS:
            runs = [r for r in records["runs"] if r["method"] == method and r["start"] == start]
            if not runs:
                continue
            row: dict[str, Any] = {}
            for metric in METRICS:
                values = [float(r["eval"]["metrics"][metric]) for r in runs]
                row[metric] = statistics.fmean(values)
                row[f"{metric}_per_seed"] = values
            row["train_s"] = [r["train"]["wall_s"] for r in runs]
            row["eval_s"] = [r["eval"]["wall_s"] for r in runs]
            row["train_cpu_s"] = [r["train"].get("cpu_s", float("nan")) for r in runs]
            row["eval_cpu_s"] = [r["eval"].get("cpu_s", float("nan")) for r in runs]
            row["log"] = [r["train"]["log"] for r in runs]
            table[method][start] = row
    return table


def flower_wins(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, bool]]:
    """Per method and metric: is the Flower-based mean better than the SFT-based one (direction per metric)?"""
    wins: dict[str, dict[str, bool]] = {}
    for method, rows in table.items():
        if set(STARTS) <= rows.keys():
            wins[method] = {
                m: (rows["flower"][m] > rows["sft"][m]) == HIGHER_IS_BETTER[m] and rows["flower"][m] != rows["sft"][m]
                for m in METRICS
            }
    return wins


def _fmt(metric: str, value: float) -> str:
    if metric == "distinct_titles":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.3f}" if metric in ("H", "DGU@10") else f"{value:.4f}"


def _cell(row: dict[str, Any], metric: str) -> str:
    """Mean, with the per-seed values in brackets when there are several seeds."""
    seeds = row[f"{metric}_per_seed"]
    text = _fmt(metric, row[metric])
    return text + (" (" + ", ".join(_fmt(metric, v) for v in seeds) + ")" if len(seeds) > 1 else "")


def markdown(payload: dict[str, Any]) -> str:
    """The results page: command, versions, scale, the SFT- vs Flower-based table, timings, the paper beside."""
    args, table, starts = payload["args"], payload["table"], payload["starts"]
    head = "| method | start | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS)
    lines = [
        f"# RQ3: Flower as the reference policy ({args['dataset']}, {args['split']} split)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Versions: {payload['versions']}  ",
        f"Machine: {payload['machine']}  ",
        f"Time of the whole run: {payload['wall_s']:.0f} s wall, {payload['cpu_s']:.0f} s CPU of this process  ",
        f"Scale: {payload['scale']}",
        "",
        "## Starting checkpoints (policy init = reference)",
        "",
        head,
    ]
    for start in STARTS:
        m = starts[start]["metrics"]
        lines.append(f"| start | {start} | " + " | ".join(_fmt(k, m[k]) for k in METRICS) + " |")
    lines += ["", "## SFT-based vs Flower-based (mean over seeds; per-seed values in brackets)", "", head]
    for method, rows in table.items():
        for start in STARTS:
            if start in rows:
                cells = " | ".join(_cell(rows[start], k) for k in METRICS)
                lines.append(f"| {METHOD_NAMES[method]} | {start} | {cells} |")
    lines += [
        "",
        "Flower-based better than SFT-based (means; NDCG/HR/H/TTR/distinct higher, DGU/MGU lower):",
        "",
        "| method | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for method, wins in payload["flower_wins"].items():
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join("yes" if wins[k] else "no" for k in METRICS) + " |")
    lines += [
        "",
        "## Time per method (s, per seed; wall on the shared machine, CPU time of this process ≈ wall when alone)",
        "",
        "| method | start | train wall | train CPU | evaluate wall | evaluate CPU |",
        "|---|---|---|---|---|---|",
    ]

    def seconds(values: list[float]) -> str:
        return ", ".join(f"{t:.0f}" for t in values)

    for method, rows in table.items():
        for start, row in rows.items():
            lines.append(
                f"| {METHOD_NAMES[method]} | {start} | {seconds(row['train_s'])} | "
                f"{seconds(row['train_cpu_s'])} | {seconds(row['eval_s'])} | {seconds(row['eval_cpu_s'])} |"
            )
    lines += ["", "## Training logs (first → last logged step, per seed)", ""]
    for method, rows in table.items():
        for start, row in rows.items():
            logs = "; ".join(f"{lg.get('first')} → {lg.get('last')}" for lg in row["log"])
            lines.append(f"- {METHOD_NAMES[method]} from {start}: {logs}")
    lines += [
        "",
        "## The paper beside ours",
        "",
        payload["paper_note"],
        "",
        "| paper (Movies, Table 4) | " + " | ".join(METRICS[:6]) + " |",
        "|---|" + "---|" * 6,
    ]
    for name, values in PAPER_MOVIES.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(k, values[k]) for k in METRICS[:6]) + " |")
    return "\n".join(lines) + "\n"


PAPER_NOTE = (
    "The paper (arXiv 2503.07377, RQ3) reports that DPO, S-DPO, DMPO, RosePO and PPO started from a Flower checkpoint "
    "(policy init = reference = Flower, the F_* rows) beat the same methods started from BIGRec (the B_* rows) on "
    "accuracy, fairness and diversity. Its RQ3 table is not in the project's reference notes "
    "(../shared/reference/flower_reference.md appendix lists Tables 3, 4 and 6 only), so no per-method paper numbers "
    "are quoted here; for scale, the paper's two starting points on Movies (Table 4, Qwen2.5-1.5B, full data) are:"
)


def write_results(args: argparse.Namespace, records: dict[str, Any], wall_s: float, cpu_s: float) -> dict[str, Any]:
    """Aggregate, then write ``<out>.json`` and ``<out>.md``; returns the payload."""
    import torch

    table = aggregate(records, args.methods)
    rows = (
        f"first {args.test_rows or 'all'}"
        if args.row_sample_seed is None
        else f"a random sample (seed {args.row_sample_seed}) of {args.test_rows}"
    )
    scale = (
        f"{args.train_rows or 'all'} training rows (random subsample, seed 0), {args.steps} optimiser steps "
        f"per run, batch {args.batch_size} (DPO family: rows; RLOO: completions, {args.num_generations} per "
        f"prompt), lr {args.learning_rate:g} (AdamW, linear decay, no warm-up), DPO-family β {args.beta:g}, "
        f"RLOO β {args.rloo_beta:g}; seeds {args.seeds}; evaluation: {rows} rows of "
        f"the {args.split} split, trie-constrained beam search with 10 beams (top-10), length penalty 1"
    )
    payload = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "versions": _versions(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs shared with other jobs, torch threads "
        f"{torch.get_num_threads()}, load average at the end {os.getloadavg()[0]:.2f}",
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
        "scale": scale,
        "args": vars(args),
        "starts": records["starts"],
        "table": table,
        "flower_wins": flower_wins(table),
        "runs": records["runs"],
        "paper_movies_table4": PAPER_MOVIES,
        "paper_note": PAPER_NOTE,
    }
    spine.write_results(args.out, payload, markdown(payload), indent=1, default=str)  # a prefix may contain dots
    return payload


# ------------------------------------------------------------------------------------------------------ own pair


def build_pair(args: argparse.Namespace) -> None:
    """A starting pair of our own: tiny Qwen2 (trl_flower.tiny, BPE on titles + prompt text) trained from scratch
    with methods sft and flower through `trl_flower.run.train` (same rows, epochs, batch, lr, seed; the data and
    prompts as `trl-flower train` builds them)."""
    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.run import config_class, load_tokenizer, method_defaults, recommendation_data, train
    from trl_flower.tiny import save_tiny_model

    root = Path(args.build_pair)
    data = load_amazon(args.dataset, data_root=args.data_root, splits=("train",))
    raw = PromptBuilder.from_dataset(data.name, mode="reference")
    text = [raw(h) for h in data.splits["train"]["history_item_title"][:400]]
    init = save_tiny_model(
        root / "init", list(data.items) * 3 + text, vocab_size=2048, hidden_size=128, num_layers=2, seed=0
    )
    budget = dict(
        learning_rate=2e-3,
        num_train_epochs=args.pair_epochs,
        per_device_train_batch_size=32,
        logging_steps=50,
        seed=0,
        save_strategy="no",
        bf16=False,
        report_to="none",
        disable_tqdm=True,
    )
    for method in STARTS:
        _log(f"build pair: method {method} from {init} on the first {args.pair_rows} training rows")
        tokenizer = load_tokenizer(init, method)
        builder = PromptBuilder.from_dataset(data.name, mode="reference", tokenizer=tokenizer)
        run_data = recommendation_data(data, builder, max_train_rows=args.pair_rows)
        config = config_class(method)(output_dir=str(root / method), **{**method_defaults(method), **budget})
        train(method, init, run_data, config, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    import torch

    args = make_parser().parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)  # the 2 cores are shared: more threads only contend
    if args.build_pair:
        build_pair(args)
        return 0
    begin, cpu = time.perf_counter(), time.process_time()
    records = run_experiment(args)
    payload = write_results(args, records, time.perf_counter() - begin, time.process_time() - cpu)
    _log(f"wrote {args.out}.md ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
