"""What moves Flower in RQ2: one Flower knob at a time against the RQ2 run's own BIGRec and Flower checkpoints.

Issue 6 asks, where Flower does not beat SFT on fairness, to find what moves it (reward variant, λ, loss variant,
sampling temperature). Each knob here is one extra Flower training of an RQ2 seed that changes one setting of the
RQ2 Flower run (``div_s`` reward, λ 0.005, the official loss, on-policy sampling at T = 1) and keeps everything else:
the seed's tiny-model initial weights and tokenizer, the training rows, batches, epochs and schedule, and the decoder
(trie-constrained beam search, 10 beams). Every knob and the RQ2 references (BIGRec = SFT, Flower at λ 0.005 and
at λ 0.001 when present) are evaluated on the same valid and test rows as RQ2.

Run `bench/rq2_recommend.py` first and pass this script the same ``--runs-dir`` and training arguments
(``--epochs``, ``--train-rows``, ``--batch-size``, ...; ``--lambdas`` and ``--flower-reward-variant`` name and describe
its Flower checkpoints): this script reuses its tokenizer, initial weights and checkpoints from
``--runs-dir/<dataset>/seed<S>/`` and writes its own checkpoints there as ``knob_<name>/``. Finished trainings and
evaluations are reused, so knobs can run as parallel processes (``--knobs a b`` in one, ``--knobs c d`` in another)
and be merged with ``--report-only``.

Usage::

    python bench/rq2_knobs.py --dataset Movies_and_TV --sasrec-dir /tmp/rq2full/sasrec_movies --seeds 0 \\
        --train-rows 0 --epochs 3 --valid-rows 300 --test-rows 1000 --row-sample-seed 0 --runs-dir /tmp/rq2e3/runs \\
        --lambdas 0.005 0.001 --flower-reward-variant div_s --knobs reward_none reward_exact

Writes ``bench/results/<--tag>.{json,md}`` (default ``rq2_knobs_<dataset>``) and ``<tag>_group_shares.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# modules beside this script: the RQ2 study (rq2_recommend.py's setup, trainers and evaluation) and the bench spine
import rq2_study as rq2
from spine import load_average, use_this_checkout, versions, with_notes

use_this_checkout()  # this checkout's trl_flower, also when another one is installed


@dataclass(frozen=True)
class Knob:
    """One Flower setting that differs from the RQ2 Flower run in one respect."""

    flow_lambda: float
    reward_variant: str
    options: dict[str, Any] = field(default_factory=dict)
    what: str = ""
    item_reward: str = "counts"  # "counts": training interactions + 1 (RQ2); "uniform": 1 for every item


PAPER_LAMBDA = 0.005
KNOBS: dict[str, Knob] = {
    "reward_none": Knob(PAPER_LAMBDA, "none", {}, "reward: item popularity only (no SASRec scores)"),
    "reward_add_logs": Knob(PAPER_LAMBDA, "add_logs", {}, "reward: log s(u, i) added to every log reward"),
    "reward_exact": Knob(
        PAPER_LAMBDA,
        "exact",
        {},
        "reward: per-user flows from R(i)·s(u, i) pushed through the tree (consistent, personal)",
    ),
    "sample_T2": Knob(PAPER_LAMBDA, "div_s", {"temperature": 2.0}, "on-policy sampling temperature 2 (RQ2: 1)"),
    "offline0.5": Knob(
        PAPER_LAMBDA,
        "div_s",
        {"offline_trajectory_prob": 0.5},
        "half of the flow batches on the teacher-forced target items instead of samples",
    ),
    "item_uniform": Knob(
        PAPER_LAMBDA,
        "div_s",
        {},
        "item reward R(i) = 1 for every item instead of interactions + 1 (flows ∝ the number of titles below a prefix)",
        item_reward="uniform",
    ),
    "tree_lam0.01": Knob(0.01, "div_s", rq2.VARIANT, "tree-normalised loss (RQ1's winner), λ 0.01"),
    "tree_lam0.05": Knob(0.05, "div_s", rq2.VARIANT, "tree-normalised loss (RQ1's winner), λ 0.05"),
}
COLUMNS = ("NDCG@5", "HR@5", "DGU@10", "MGU@10", "H", "TTR", "distinct_titles")


def make_parser() -> argparse.ArgumentParser:
    """RQ2's arguments (the same training and evaluation settings) plus the knob selection."""
    p = rq2.make_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--knobs",
        nargs="+",
        default=list(KNOBS),
        choices=list(KNOBS),
        help="knobs to train and evaluate (default: all; "
        + "; ".join(f"{k}: {v.what}" for k, v in KNOBS.items())
        + ")",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished knobs of --knobs (e.g. after running them as separate processes)",
    )
    p.add_argument(
        "--no-references",
        action="store_true",
        help="do not evaluate RQ2's own checkpoints (e.g. in all but one of several parallel processes)",
    )
    return p


def references(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """RQ2's own checkpoints, evaluated beside the knobs when present: label -> (directory name, description).

    BIGRec, and Flower at every λ of ``--lambdas`` (pass RQ2's ``--lambdas`` and ``--flower-reward-variant``)."""
    out = {"BIGRec (SFT)": ("sft", "RQ2's SFT")}
    for lam in args.lambdas:
        out[f"Flower λ {lam:g} (RQ2)"] = (
            rq2.flower_name(lam, args),
            f"RQ2's Flower: {args.flower_reward_variant}, λ {lam:g}, official loss, T = 1",
        )
    return out


def train_knob(setup: rq2.Setup, init_dir: Path, out: Path, args: argparse.Namespace, seed: int, knob: Knob) -> float:
    """Train one knob with RQ2's `train_flower`; returns the wall time (also saved beside the checkpoint)."""
    knob_args = argparse.Namespace(**{**vars(args), "flower_reward_variant": knob.reward_variant})
    rewards = None  # RQ2's default: interactions + 1
    if knob.item_reward == "uniform":
        import numpy as np

        rewards = np.ones(setup.data.num_items, dtype=np.float64)
    start = time.perf_counter()
    rq2.train_flower(setup, init_dir, out, knob_args, seed, knob.flow_lambda, item_rewards=rewards, **knob.options)
    wall = round(time.perf_counter() - start, 1)
    (out / "knob_train.json").write_text(json.dumps({"wall_s": wall, "knob": asdict(knob)}, indent=1))
    return wall


def evaluate_both(model_dir: Path, label: str, seed_dir: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Valid and test records of one checkpoint (the RQ2 study's cached evaluation), in this script's eval dirs."""
    return {
        split: rq2.evaluate(model_dir, label, split, rows, seed_dir / f"eval_knobs_{split}" / name, args)
        for split, rows in (("valid", args.valid_rows), ("test", args.test_rows))
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the missing knobs (unless --report-only), evaluate everything, write the results."""
    import torch

    from trl_flower.evaluation.plots import plot_group_shares

    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    setup = rq2.Setup(args)
    root = Path(args.runs_dir) / args.dataset
    tok_dir = rq2.build_tokenizer_dir(setup, args, root)
    per_seed: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        seed_dir = root / f"seed{seed}"
        init_dir = rq2.build_init_dir(tok_dir, args, seed, seed_dir / "init")
        rows: dict[str, Any] = {}
        for label, (name, what) in references(args).items():
            if not args.no_references and rq2.is_finished(seed_dir / name):
                rows[label] = {
                    "what": what,
                    "checkpoint": name,
                    **evaluate_both(seed_dir / name, label, seed_dir, name, args),
                }
        for name in args.knobs:
            knob, out = KNOBS[name], seed_dir / f"knob_{name}"
            if not rq2.is_finished(out):
                if args.report_only:
                    rq2.log(f"seed {seed}: knob {name} not trained, left out of the report")
                    continue
                rq2.log(f"seed {seed}: training knob {name} ({knob.what}) -> {out}")
                train_knob(setup, init_dir, out, args, seed, knob)
            train = json.loads((out / "knob_train.json").read_text())
            rows[name] = {
                "what": knob.what,
                "checkpoint": out.name,
                "knob": asdict(knob),
                "train_wall_s": train["wall_s"],
                **evaluate_both(out, name, seed_dir, out.name, args),
            }
        per_seed[str(seed)] = rows
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"rq2_knobs_{args.dataset}"
    first = per_seed[str(args.seeds[0])]
    plot = results_dir / f"{stem}_group_shares.png"
    plot_group_shares(
        {k: v["test"]["group_shares"] for k, v in first.items()},
        list(setup.popularity.shares),
        reference_label="train histories",
        path=plot,
        title=f"{args.dataset}: top-10 popularity-group shares per Flower knob (test, seed {args.seeds[0]})",
    )
    report = {
        "dataset": args.dataset,
        "command": "python bench/rq2_knobs.py " + shlex.join(sys.argv[1:]),
        "versions": versions("trl_flower", "git_commit", "trl", "transformers", "torch", "numpy", "python"),
        "settings": vars(args),
        "baseline_knob": {
            "flow_lambda": PAPER_LAMBDA,
            "reward_variant": "div_s",
            "item_reward": "interactions + 1",
            "loss": "official (vocabulary)",
            "temperature": 1.0,
            "offline_trajectory_prob": 0.0,
        },
        "per_seed": per_seed,
        "reference_shares": list(map(float, setup.popularity.shares)),
        "files": {"plot": str(plot)},
        "wall_time_s": round(time.perf_counter() - wall_start, 1),
        "load_average_end": load_average(),
    }
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    # RQ2's --notes: the analysis and how the runs were split into processes
    (results_dir / f"{stem}.md").write_text(with_notes(to_markdown(report), args.notes))
    rq2.log(f"wrote {results_dir / stem}.json/.md and {plot}")
    return report


def _cells(metrics: dict[str, Any]) -> str:
    return " | ".join(rq2.metric_cell(c, metrics.get(c)) for c in COLUMNS)


def to_markdown(report: dict[str, Any]) -> str:
    """The results page: command, one table per seed (test, then valid), group shares."""
    s, v = report["settings"], report["versions"]
    lines = [
        f"# RQ2 knobs on {report['dataset']}: what moves Flower's accuracy and fairness",
        "",
        f"Command: `{report['command']}`  ",
        f"Versions: trl_flower {v['trl_flower']} ({v['git_commit']}), trl {v['trl']}, transformers "
        f"{v['transformers']}, torch {v['torch']}, Python {v['python']}; {s['threads']} torch thread(s) on a "
        f"2-core CPU shared with other jobs (load average at the end {report['load_average_end']}).  ",
        f"Training as RQ2: {rq2.budget_text(s['max_steps'], s['epochs'])}, batch {s['batch_size']}, "
        f"lr {s['learning_rate']:g}, "
        f"train rows {s['train_rows'] or 'all'}; rows: valid {s['valid_rows']}, test {s['test_rows']} (sample "
        f"seed {s['row_sample_seed']}); every knob changes one thing of the RQ2 Flower run "
        f"{report['baseline_knob']}.  ",
        f"Wall time of this invocation: {report['wall_time_s']:.0f} s (training times per knob below).",
        "",
    ]
    for seed, rows in report["per_seed"].items():
        for split in ("test", "valid"):
            lines += [
                f"## Seed {seed}, {split} split",
                "",
                "| run | what | " + " | ".join(COLUMNS) + " | G1 share |",
                "|---|---|" + "---|" * (len(COLUMNS) + 1),
            ]
            for name, row in rows.items():
                m = row[split]["metrics"]
                lines.append(f"| {name} | {row['what']} | {_cells(m)} | {row[split]['group_shares'][0]:.3f} |")
            lines.append("")
        trained = {k: r["train_wall_s"] for k, r in rows.items() if "train_wall_s" in r}
        lines += [
            f"Training wall time per knob, seed {seed} (s; parallel processes share the 2 cores): "
            + ", ".join(f"{k} {t:.0f}" for k, t in trained.items()),
            "",
        ]
    ref = report["reference_shares"]
    lines += [
        "Group shares of the data (train histories), G1 = most popular: "
        + ", ".join(f"{x:.3f}" for x in ref)
        + f". Plot: `{Path(report['files']['plot']).name}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Entry point."""
    args = make_parser().parse_args()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    print(to_markdown(run(args)))


if __name__ == "__main__":
    main()
