"""How much of SASRec's per-user distribution p_u a trained LM has learnt (issue 20's diagnostic).

For each run and each of the first ``--rows`` of the sampled valid rows (the rows ``bench/rq2_recommend.py``
evaluates, in the same order), the LM's exact distribution over the catalogue's titles q_u (every title scored
under the prompt, ``trl_flower.evaluation.item_distribution``) is compared with SASRec's p_u = softmax(logits_u)
(τ 1, summed per title): KL(p_u‖q_u), the overlap of the top 10s, p_u's mass on q_u's top 10, the share of the most
popular group (G1) in q_u's mass and in its top 10, and the same for the beam-search lists of the run's evaluation
(``predictions.json``), so the LM's modes and the decoder's lists can be told apart.

Example (the issue 20 follow-up; run dirs of ``bench/rq2_recommend.py``)::

    python bench/rq2_pu_diagnostic.py --dataset Movies_and_TV --sasrec-dir runs/sasrec_Movies_and_TV \\
        --method BIGRec runs/rq2/Movies_and_TV/seed0/sft runs/rq2/Movies_and_TV/seed0/eval_valid/sft \\
        --method distilled runs/.../distill_fd_a0_b1_l0.3_oof runs/.../eval_valid/distill_fd_a0_b1_l0.3_oof \\
        --rows 200 --tag rq2_pu_diagnostic_Movies_and_TV
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import spine  # beside this script: versions, the results writer

spine.use_this_checkout()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="Movies_and_TV", help="dataset folder name under the data root")
    p.add_argument("--data-root", default=None, help="data root (default: $TRL_FLOWER_DATA or ../shared/data)")
    p.add_argument("--sasrec-dir", required=True, help="a `trl-flower sasrec` output (its model/ is read)")
    p.add_argument(
        "--method",
        nargs=3,
        action="append",
        required=True,
        metavar=("LABEL", "MODEL_DIR", "EVAL_DIR"),
        help="a run to diagnose: its label, saved model dir and valid evaluation dir (with predictions.json); repeat",
    )
    p.add_argument("--rows", type=int, default=200, help="the first ROWS of the sampled valid rows are scored")
    p.add_argument("--valid-rows", type=int, default=1000, help="rows the evaluation sampled (as rq2_recommend)")
    p.add_argument("--row-sample-seed", type=int, default=0, help="the evaluation's row-sample seed")
    p.add_argument("--chunk-size", type=int, default=128, help="titles per forward when scoring the catalogue")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tag", default="rq2_pu_diagnostic", help="results file stem under --results-dir")
    p.add_argument("--results-dir", default=str(spine.RESULTS_DIR), help="where the results files go")
    return p.parse_args(argv)


def sasrec_title_probs(args, rows, items, title_of_item, num_titles):
    """p_u per title [R, T]: SASRec's softmax over items (τ 1), pooled per title; and its top-10 titles."""
    import numpy as np
    import torch

    from trl_flower.baselines.sasrec import SASRec
    from trl_flower.evaluation.item_distribution import item_to_title_mass

    model = SASRec.from_pretrained(Path(args.sasrec_dir) / "model").eval()
    with torch.no_grad():
        logits = model.score_rows(rows["history_item_id"])  # [R, N]
    p_items = torch.softmax(logits.double(), dim=1).numpy()
    p = item_to_title_mass(p_items, title_of_item, num_titles)  # [R, T]
    top_items = np.argsort(-logits.numpy(), axis=1, kind="stable")[:, :10]  # SASRec's own top-10 lists
    lists = [[items[i] for i in row] for row in top_items]
    return p, lists


def diagnose(label, model_dir, eval_dir, args, setup: dict[str, Any], log) -> dict[str, Any]:
    """Mean agreement of one run's q_u with p_u over the rows, and the same read off its beam lists."""
    import numpy as np

    from trl_flower.checkpoint import catalogue_tree, load_model, read_record
    from trl_flower.evaluation.item_distribution import agreement, title_log_probs, title_nodes

    rows, prompts, p, title_index, g1 = (setup[k] for k in ("rows", "prompts", "p", "title_index", "g1"))
    predictions = json.loads((Path(eval_dir) / "predictions.json").read_text())[: len(prompts)]
    mismatch = [
        i
        for i, (pr, t, x) in enumerate(zip(predictions, rows["item_title"], prompts))
        if pr["output"] != t or pr["input"] != x
    ]
    if len(predictions) < len(prompts) or mismatch:
        raise ValueError(
            f"{eval_dir}/predictions.json does not hold these rows in this order (first mismatch: row "
            f"{mismatch[0] if mismatch else len(predictions)}); pass the --valid-rows/--row-sample-seed it ran with"
        )
    model, tokenizer = load_model(model_dir)
    tree, _ = catalogue_tree(model_dir, setup["items"], tokenizer, record=read_record(model_dir))
    if not np.array_equal(title_nodes(tree)[0], setup["nodes"]):
        raise ValueError(f"{model_dir}'s prefix tree differs from {args.method[0][1]}'s; runs must share a tokenizer")
    per_row: dict[str, list[float]] = {}
    start = time.perf_counter()
    for r, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # the evaluation's reference prompt mode
        log_q = title_log_probs(model, ids, tree, chunk_size=args.chunk_size).numpy()
        stats = agreement(log_q, p[r], k=10)
        q_hat = np.exp(log_q - np.logaddexp.reduce(log_q))
        top_q = np.argsort(-log_q, kind="stable")[:10]
        beam = [title_index[t] for t in predictions[r]["predict"] if t in title_index]
        sasrec_top = {title_index[t] for t in setup["sasrec_lists"][r]}
        target = title_index.get(rows["item_title"][r])
        stats |= {
            "q_g1_mass": float(q_hat[g1].sum()),
            "p_g1_mass": float(p[r][g1].sum()),
            "q_top10_g1_share": float(g1[top_q].mean()),
            "beam_g1_share": float(g1[beam].mean()) if beam else float("nan"),
            "beam_overlap_sasrec": len(set(beam) & sasrec_top) / 10,
            "beam_overlap_q_top10": len(set(beam) & set(top_q.tolist())) / 10,
            "q_top10_hit": float(target in set(top_q.tolist())),
            "beam_hit": float(target in set(beam)),
        }
        for k, v in stats.items():
            per_row.setdefault(k, []).append(v)
        if (r + 1) % 50 == 0:
            log(f"{label}: {r + 1}/{len(prompts)} rows, {time.perf_counter() - start:.0f} s")
    out = {k: float(np.nanmean(v)) for k, v in per_row.items()}
    out["kl_p_q_median"] = float(np.median(per_row["kl_p_q"]))
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from trl_flower.checkpoint import catalogue_tree
    from trl_flower.data import PromptBuilder, load_amazon, popularity_from_histories, select_rows
    from trl_flower.evaluation.item_distribution import title_items, title_nodes

    torch.set_num_threads(args.threads)
    log = spine.logger("pu-diagnostic")
    started = time.time()
    run_versions = spine.versions("python", "torch", "transformers", "trl_flower", "git_commit")  # the code that runs
    data = load_amazon(args.dataset, data_root=args.data_root)
    rows = select_rows(data.splits["valid"], args.valid_rows, args.row_sample_seed).select(range(args.rows))
    first_model = args.method[0][1]
    tokenizer = AutoTokenizer.from_pretrained(first_model)  # the prompts and the shared tree; models load per run
    tree, _ = catalogue_tree(first_model, data.items, tokenizer)
    nodes, title_of_item = title_nodes(tree)
    titles = [data.items[i] for i in title_items(title_of_item)]
    popularity = popularity_from_histories(data.splits["train"]["history_item_title"])
    g1 = np.array([popularity.group_of(t) == 0 for t in titles])
    p, sasrec_lists = sasrec_title_probs(args, rows, data.items, title_of_item, len(nodes))
    builder = PromptBuilder.from_dataset(data.name, tokenizer=tokenizer)
    prompts = [builder(h) for h in rows["history_item_title"]]
    title_index = {t: i for i, t in enumerate(titles)}
    sasrec_row = {
        "top10_g1_share": float(np.mean([g1[[title_index[t] for t in lst]].mean() for lst in sasrec_lists])),
        "p_g1_mass": float(p[:, g1].sum(axis=1).mean()),
        "hit@10": float(np.mean([t in lst for t, lst in zip(rows["item_title"], sasrec_lists)])),
    }
    setup = dict(rows=rows, prompts=prompts, p=p, title_index=title_index, g1=g1, items=data.items, nodes=nodes)
    setup["sasrec_lists"] = sasrec_lists
    results = {}
    for label, model_dir, eval_dir in args.method:
        log(f"{label}: scoring {len(titles)} titles for {len(prompts)} rows")
        results[label] = diagnose(label, model_dir, eval_dir, args, setup, log)
    report = {
        "command": spine.command(),
        "versions": run_versions,
        "machine": spine.machine(threads=args.threads),
        "dataset": args.dataset,
        "rows": args.rows,
        "titles": len(titles),
        "g1_data_share": float(popularity.shares[0]),
        "sasrec": sasrec_row,
        "methods": results,
        "wall_s": round(time.time() - started, 1),
    }
    spine.write_results(Path(args.results_dir) / args.tag, report, markdown(report))
    log(f"wrote {Path(args.results_dir) / args.tag}.json")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The results page: one row per run, SASRec's own lists beneath."""
    cols = [
        ("KL(p‖q) mean / median", lambda m: f"{m['kl_p_q']:.2f} / {m['kl_p_q_median']:.2f}"),
        ("q on catalogue", lambda m: f"{m['catalogue_mass']:.3f}"),
        ("top-10 overlap q vs p", lambda m: f"{m['top_overlap']:.3f}"),
        ("p mass on q's top 10", lambda m: f"{m['q_top_mass_of_p']:.3f}"),
        ("G1 mass q / p", lambda m: f"{m['q_g1_mass']:.3f} / {m['p_g1_mass']:.3f}"),
        ("G1 share: q top 10 / beam", lambda m: f"{m['q_top10_g1_share']:.3f} / {m['beam_g1_share']:.3f}"),
        ("beam ∩ SASRec top 10", lambda m: f"{m['beam_overlap_sasrec']:.3f}"),
        ("beam ∩ q top 10", lambda m: f"{m['beam_overlap_q_top10']:.3f}"),
        ("HR@10 q top 10 / beam", lambda m: f"{m['q_top10_hit']:.3f} / {m['beam_hit']:.3f}"),
    ]
    lines = [
        f"# How much of SASRec's p_u the LM learnt: {report['dataset']}, first {report['rows']} sampled valid rows",
        "",
        f"`{report['command']}`",
        "",
        f"{report['titles']} distinct titles; G1 (most popular group) holds {report['g1_data_share']:.3f} of the "
        "training interactions. q = the LM's exact title distribution (renormalised over the catalogue), p = SASRec's "
        "softmax (τ 1) pooled per title; beam = the run's 10-beam evaluation lists.",
        "",
        "| run | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, m in report["methods"].items():
        lines.append(f"| {label} | " + " | ".join(f(m) for _, f in cols) + " |")
    s = report["sasrec"]
    lines += [
        "",
        f"SASRec's own top 10: G1 share {s['top10_g1_share']:.3f}, HR@10 {s['hit@10']:.3f}; p's mean G1 mass "
        f"{s['p_g1_mass']:.3f}.",
        "",
        f"Versions: {report['versions']}. Wall time {report['wall_s']} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
