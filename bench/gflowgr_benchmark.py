"""Benchmark: GFlowGR (TB, DB) vs SFT vs S-DPO on Amazon Movies_and_TV with a small LM trained from scratch.

Every item is a semantic ID (residual k-means over all-MiniLM-L6-v2 title embeddings, L = 3 levels + 1 collision
level, `trl_flower.gflowgr.semantic_ids`). A prompt is the codes of the user's history items followed by " Next:";
the target is the next item's code path (L + 1 code tokens and EOS). The LM is a tiny Qwen2 (`trl_flower.tiny`)
whose vocabulary is a 270-symbol byte BPE plus the code tokens, randomly initialised per seed.

Two stages per seed. Stage 1 trains the LM from scratch with SFT for ``--sft-steps`` steps (shared by all methods
of the seed; reported as ``sft-stage1``). Stage 2 fine-tunes that checkpoint for ``--steps`` more steps with each
method (same training rows, batch size and step count):

* ``sft``: `GFlowGRTrainer` with ``gfn_loss="none"`` and no augmented items, i.e. exactly the L_GR term of GFlowGR
  (next-token loss on the positive's path, summed over tokens, mean over rows): SFT simply continues. So SFT and
  GFlowGR differ only by the λ·L_GFN term.
* ``tb`` / ``db``: `GFlowGRTrainer` with trajectory balance (learned log Z(U)) or detailed balance (learned flow
  head), N augmented trajectories from the chosen sampler, the sum reward (r_a + SASRec r_ŷ + r_sim).
* ``sdpo``: S-DPO (`trl_flower.baselines.preference`, 3 uniform negatives) with the stage-1 model as reference.

Why two stages: GFlowGR trained from scratch with λ = 1 did not learn at this scale (the TB residuals of
near-uniform trajectories dominate the clipped gradient; see the results page), and the paper's S-DPO baseline
starts from SFT anyway.

The collaborative model (CM) is one SASRec trained on the full train split with early stopping on valid (seed 1),
shared by all seeds; its train-row logits feed the curriculum sampler and r_ŷ.

Evaluation: trie-constrained beam search over the code prefix tree (`trl_flower.evaluation.recommend.recommend`,
10 beams, top 10), then `trl_flower.evaluation.metrics.recommendation_metrics` at title level (Recall@K = HR@K with
one target per row), DGU/MGU@10, plus item-level Recall/NDCG and the number of distinct recommended items.

Usage::

    python bench/gflowgr_benchmark.py --help
    # tuning grid on the valid split (1 seed):
    python bench/gflowgr_benchmark.py --split valid --seeds 0 --methods sft tb --lambdas 0.1 1 \\
        --samplers curriculum random --out bench/results/gflowgr_movies_grid
    # final run (test split; defaults = the valid-grid choices λ = 0.01, random sampler):
    python bench/gflowgr_benchmark.py --split test --seeds 0 1 --methods sft tb db sdpo
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import spine  # beside this script: the bench spine
from spine import RESULTS_DIR, paper_numbers, use_this_checkout, versions

use_this_checkout()  # this checkout's trl_flower, also when another one is installed

GFN_METHODS = ("tb", "db")
ALL_METHODS = ("sft", "tb", "db", "sdpo")
REPORTED = (
    "HR@5",
    "HR@10",
    "NDCG@5",
    "NDCG@10",
    "item_HR@5",
    "item_NDCG@5",
    "item_HR@10",
    "item_NDCG@10",
    "DGU@10",
    "MGU@10",
    "distinct_items@10",
    "distinct_titles",
)


# ================================================================================================ setup


@dataclass
class Bench:
    """Everything shared by all methods and seeds: data, semantic IDs, tokenizer, tree, CM scores, row subsets."""

    data: object
    ids: object
    tokenizer: object
    tree: object
    train_rows: list[dict]
    eval_rows: list[dict]
    cm_scores: np.ndarray  # [len(train_rows), num_items] SASRec logits of the selected training rows
    popularity: object
    timings: dict[str, float] = field(default_factory=dict)


def prompt_of(ids, history: list[int], max_history: int) -> str:
    """The prompt: the code strings of the last `max_history` history items, then " Next:"."""
    return "".join(ids.item_strings(history[-max_history:])) + " Next:"


def select_rows(n_total: int, n_wanted: int, seed: int) -> np.ndarray:
    """A fixed random subset of row indices (all rows when n_wanted <= 0), sorted (keeps the file order)."""
    if n_wanted <= 0 or n_wanted >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n_wanted, replace=False))


def build_semantic_ids(data, args: argparse.Namespace):
    """Semantic IDs from the cached title embeddings (computed and cached on first use)."""
    from trl_flower.gflowgr.semantic_ids import embed_titles, fit_semantic_ids

    cache = Path(args.embedding_cache)
    if cache.exists():
        emb = np.load(cache)
    else:
        emb = embed_titles(data.items)
        np.save(cache, emb)
    return fit_semantic_ids(emb, num_levels=args.levels, codebook_size=args.codebook_size, seed=0)


def fit_cm(data, args: argparse.Namespace):
    """The collaborative model: SASRec on the full train split, early stopping on valid (cached to disk)."""
    from trl_flower.baselines.sasrec import SASRec, SASRecTrainingArguments, fit_sasrec

    cache = Path(args.work_dir) / f"sasrec_{data.name}_e{args.sasrec_epochs}"
    if (cache / "sasrec_config.json").is_file():
        return SASRec.from_pretrained(cache)
    sasrec, result = fit_sasrec(
        data, SASRecTrainingArguments(epochs=args.sasrec_epochs, patience=10, seed=1, progress=False)
    )
    print(f"SASRec: best epoch {result.best_epoch}, valid NDCG@20 {result.best_valid_ndcg:.4f}", flush=True)
    sasrec.save_pretrained(cache)
    return sasrec


def setup(args: argparse.Namespace) -> Bench:
    """Load data, build semantic IDs, tokenizer, tree, CM scores and the row subsets."""
    from trl_flower.data import load_amazon, popularity_from_histories
    from trl_flower.tiny import build_tokenizer

    t0 = time.perf_counter()
    data = load_amazon(args.category)
    ids = build_semantic_ids(data, args)
    tok = build_tokenizer(["Next:"], vocab_size=270)
    ids.add_code_tokens(tok)
    tree = ids.build_tree(tok.eos_token_id)
    timings = {"semantic_ids_s": time.perf_counter() - t0}

    train = data.splits["train"]
    tr_idx = select_rows(len(train), args.train_rows, seed=12345)
    hist = [list(train[int(i)]["history_item_id"]) for i in tr_idx]
    targets = [int(train[int(i)]["item_id"]) for i in tr_idx]
    train_rows = [
        {"prompt": prompt_of(ids, h, args.max_history), "item_id": t, "history": h, "row_index": r}
        for r, (h, t) in enumerate(zip(hist, targets))
    ]
    split = data.splits[args.split]
    ev_idx = select_rows(len(split), args.test_rows, seed=54321)
    eval_rows = [
        {
            "prompt": prompt_of(ids, list(split[int(i)]["history_item_id"]), args.max_history),
            "item_id": int(split[int(i)]["item_id"]),
            "title": split[int(i)]["item_title"],
        }
        for i in ev_idx
    ]

    t0 = time.perf_counter()
    sasrec = fit_cm(data, args)
    cm = sasrec.score_rows(hist).numpy()
    timings["cm_s"] = time.perf_counter() - t0
    popularity = popularity_from_histories(train["history_item_title"])
    return Bench(data, ids, tok, tree, train_rows, eval_rows, cm, popularity, timings)


# ================================================================================================ training


def base_model(bench: Bench, args: argparse.Namespace, seed: int):
    """A fresh tiny Qwen2 over the byte BPE + code-token vocabulary, initialised with `seed`."""
    from trl_flower.tiny import build_model

    return build_model(bench.tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=seed)


def gflowgr_args(out_dir: Path, args, seed: int, method: str, lam: float, sampler: str, steps: int):
    """`GFlowGRConfig` for SFT (gfn_loss none, no augmentation) or TB/DB; optimiser settings identical."""
    from trl_flower.gflowgr import GFlowGRConfig

    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.lr,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_prompt_length=256,
    )
    if method == "sft":
        return GFlowGRConfig(
            gfn_loss="none", num_augmented=0, sampling_strategy="random", score_source="none", **common
        )
    return GFlowGRConfig(
        gfn_loss=method,
        gfn_lambda=lam,
        num_augmented=args.num_augmented,
        sampling_strategy=sampler,
        score_source="cm",
        log_z=args.log_z,
        detach_head_inputs=args.detach_head_inputs,
        reward_similarity=args.reward_similarity,
        **common,
    )


def train_gflowgr(
    bench: Bench, args, seed: int, method: str, lam: float, sampler: str, out_dir: Path, init: Path | None, steps: int
):
    """Train SFT / TB / DB from `init` (a checkpoint dir) or from scratch; returns (trainer, last logged losses)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_flower.gflowgr import GFlowGRTrainer

    model = base_model(bench, args, seed) if init is None else AutoModelForCausalLM.from_pretrained(init)
    trainer = GFlowGRTrainer(
        model,
        args=gflowgr_args(out_dir, args, seed, method, lam, sampler, steps),
        train_dataset=Dataset.from_list(bench.train_rows),
        processing_class=bench.tokenizer,
        semantic_ids=bench.ids,
        cm_scores=None if method == "sft" else bench.cm_scores,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sft_loss" in h]
    return trainer, (logs[-1] if logs else {})


def save_checkpoint(trainer, bench: Bench, out_dir: Path) -> Path:
    """Save model + tokenizer (what S-DPO and the stage-2 methods load)."""
    trainer.save_model(str(out_dir))
    bench.tokenizer.save_pretrained(str(out_dir))
    return out_dir


def train_sdpo(bench: Bench, args, seed: int, init: Path, out_dir: Path, lr: float):
    """S-DPO from the stage-1 SFT checkpoint (also the reference) through `trl_flower.run.train`; returns the
    trainer (nothing saved)."""
    from datasets import Dataset

    from trl_flower.run import RunData, config_class, method_defaults, train

    ds = Dataset.from_dict(
        {"prompt": [r["prompt"] for r in bench.train_rows], "item_id": [r["item_id"] for r in bench.train_rows]}
    )
    settings = dict(
        max_steps=args.steps,
        learning_rate=lr,
        beta=args.sdpo_beta,
        per_device_train_batch_size=args.batch_size,
        seed=seed,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=max(1, args.steps // 5),
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
    )
    config = config_class("sdpo")(output_dir=str(out_dir), **{**method_defaults("sdpo"), **settings})
    data = RunData(items=bench.data.items, train_dataset=ds, name=bench.data.name)
    run = train("sdpo", init, data, config, tree=bench.tree, tokenizer=bench.tokenizer, negative_seed=seed, save=False)
    return run.trainer


# ================================================================================================ evaluation


def evaluate(model, bench: Bench, args) -> dict:
    """Beam-search top-10 over the code tree; title-level metrics (metrics.py) plus item-level ones."""
    from trl_flower.evaluation.metrics import hit_matrix, hr_ndcg_at_k, recommendation_metrics
    from trl_flower.evaluation.recommend import recommend

    model.eval()
    prompts = [r["prompt"] for r in bench.eval_rows]
    recs = recommend(
        model,
        bench.tokenizer,
        prompts,
        bench.tree,
        top_k=10,
        num_beams=10,
        batch_size=args.eval_batch_size,
        show_progress=False,
    )
    items = recs.item_ids  # [U, 10]
    titles = np.asarray([[bench.data.items[i] if i >= 0 else "" for i in row] for row in items.tolist()])
    out = recommendation_metrics(
        titles, [r["title"] for r in bench.eval_rows], bench.popularity, bench.data.items, ks=(5, 10)
    )
    item_hits = items == np.asarray([r["item_id"] for r in bench.eval_rows])[:, None]
    out.update({f"item_{k}": v for k, v in hr_ndcg_at_k(item_hits, (5, 10)).items()})
    out["distinct_items@10"] = int(np.unique(items[items >= 0]).size)
    assert hit_matrix(titles, [r["title"] for r in bench.eval_rows]).shape == items.shape
    return out


# ================================================================================================ driver


def variants(args) -> list[tuple[str, str, float, str]]:
    """(label, method, λ or S-DPO lr, sampler) for every requested stage-2 method and grid point."""
    out = []
    for m in args.methods:
        if m in GFN_METHODS:
            for lam in args.lambdas:
                for s in args.samplers:
                    tag = (",detached" if args.detach_head_inputs else "") + (
                        ",prefix-sim" if args.reward_similarity == "prefix" else ""
                    )
                    out.append((f"{m}[λ={lam:g},{s},N={args.num_augmented}{tag}]", m, lam, s))
        elif m == "sdpo":
            out += [(f"sdpo[lr={lr:g},β={args.sdpo_beta:g}]", m, lr, "uniform") for lr in args.sdpo_lrs]
        else:
            out.append((m, m, 0.0, "-"))
    return out


def run_one(
    bench: Bench, args, seed: int, label: str, method: str, lam: float, sampler: str, init: Path | None, steps: int
) -> tuple[dict, object]:
    """Train one variant, evaluate it, return (result row, trainer)."""
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    work = Path(args.work_dir) / f"seed{seed}" / label
    if method == "sdpo":
        trainer = train_sdpo(bench, args, seed, init, work, lr=lam)
        last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    else:
        trainer, last = train_gflowgr(bench, args, seed, method, lam, sampler, work, init, steps)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate(trainer.model, bench, args)
    row = {
        "seed": seed,
        "label": label,
        "method": method,
        "lambda_or_lr": lam,
        "sampler": sampler,
        "steps": steps,
        "train_s": round(t_train, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
        "last_log": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        **metrics,
    }
    print(json.dumps({k: row[k] for k in ("seed", "label", "train_s", "eval_s", *REPORTED)}), flush=True)
    return row, trainer


def run_seed(bench: Bench, args, seed: int) -> list[dict]:
    """Stage 1 (SFT from scratch), then every stage-2 variant from its checkpoint, for one seed."""
    reuse = Path(args.reuse_stage1.format(seed=seed)) if args.reuse_stage1 else None
    if reuse is not None and (reuse / "config.json").is_file():  # a grid run's stage 1 with the same settings
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        metrics = evaluate(AutoModelForCausalLM.from_pretrained(reuse), bench, args)
        rows = [
            {
                "seed": seed,
                "label": "sft-stage1",
                "method": "sft",
                "reused_from": str(reuse),
                "steps": args.sft_steps,
                "train_s": 0.0,
                "eval_s": round(time.perf_counter() - t0, 1),
                **metrics,
            }
        ]
        init = reuse
    else:
        row, trainer = run_one(bench, args, seed, "sft-stage1", "sft", 0.0, "-", None, args.sft_steps)
        rows = [row]
        init = save_checkpoint(trainer, bench, Path(args.work_dir) / f"seed{seed}" / "sft_stage1")
    for label, method, lam, sampler in variants(args):
        rows.append(run_one(bench, args, seed, label, method, lam, sampler, init, args.steps)[0])
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and per-seed values of the reported metrics per variant label (in first-seen order)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    out = []
    for lab in labels:
        rs = [r for r in rows if r["label"] == lab]
        summ = {
            "label": lab,
            "seeds": [r["seed"] for r in rs],
            "train_s": round(statistics.mean(r["train_s"] for r in rs), 1),
        }
        for k in REPORTED:
            vals = [float(r[k]) for r in rs]
            summ[k] = statistics.mean(vals)
            summ[k + "_per_seed"] = vals
        out.append(summ)
    return out


def markdown(result: dict) -> str:
    """A compact results table (mean over seeds; per-seed values in the JSON)."""
    a, setup_s = result["args"], result["timings"]
    lines = [
        f"# GFlowGR benchmark: {a['category']} ({a['split']} split)",
        "",
        f"Command: `{result['command']}`  ",
        f"Versions: {json.dumps(result['versions'])}  ",
        f"Scale: {result['scale']}  ",
        f"Seeds: {a['seeds']}; total wall time {result['wall_s'] / 60:.1f} min on a shared 2-core CPU, "
        f"{a['threads']} torch thread(s); setup (s) {json.dumps({k: round(v, 1) for k, v in setup_s.items()})}.",
        "",
        "Title-level Recall/NDCG (metrics.py), item-level Recall/NDCG, DGU/MGU@10, distinct recommended items over "
        "all top-10 lists. Mean over seeds; train s = mean training wall time per seed.",
        "",
        "| method | R@5 | R@10 | N@5 | N@10 | item R@5 | item N@5 | item R@10 | item N@10 | DGU@10 | MGU@10 "
        "| distinct items | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['label']} | {s['HR@5']:.4f} | {s['HR@10']:.4f} | {s['NDCG@5']:.4f} | {s['NDCG@10']:.4f} | "
            f"{s['item_HR@5']:.4f} | {s['item_NDCG@5']:.4f} | {s['item_HR@10']:.4f} | {s['item_NDCG@10']:.4f} | "
            f"{s['DGU@10']:.3f} | {s['MGU@10']:.3f} | {s['distinct_items@10']:.0f} | {s['train_s']:.0f} |"
        )
    lines += [
        "",
        "Per seed (N@5, title level): "
        + "; ".join(f"{s['label']}: {', '.join(f'{v:.4f}' for v in s['NDCG@5_per_seed'])}" for s in result["summary"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--category", default="Movies_and_TV")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="evaluation split (tune on valid)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-rows", type=int, default=8000, help="training rows (random subset; 0 = all)")
    p.add_argument("--test-rows", type=int, default=1500, help="evaluation rows (random subset; 0 = all)")
    p.add_argument("--sft-steps", type=int, default=800, help="stage 1: SFT steps from scratch (shared)")
    p.add_argument("--steps", type=int, default=300, help="stage 2: steps of every method (same budget)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=[0.01],
        help="GFlowNet weight λ (grid; default = the valid-grid choice, the paper's is 1)",
    )
    p.add_argument(
        "--samplers",
        nargs="+",
        default=["random"],
        help="trajectory sampler(s) (grid; default = the valid-grid choice, the paper's is curriculum)",
    )
    p.add_argument("--log-z", default="prompt", choices=("prompt", "scalar"), help="TB log Z: head or scalar")
    p.add_argument("--detach-head-inputs", action="store_true", help="log Z / flow heads on detached states")
    p.add_argument(
        "--reward-similarity",
        default="position",
        choices=("position", "prefix"),
        help="r_sim: position-wise code matches (paper) or shared-prefix length (ours)",
    )
    p.add_argument("--num-augmented", type=int, default=3, help="N augmented trajectories per positive")
    p.add_argument("--sdpo-lrs", type=float, nargs="+", default=[1e-4], help="S-DPO learning rate(s) (grid)")
    p.add_argument("--sdpo-beta", type=float, default=0.3)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--max-history", type=int, default=10)
    p.add_argument("--sasrec-epochs", type=int, default=60)
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--embedding-cache", default="/tmp/trl_flower_movies_minilm.npy")
    p.add_argument("--work-dir", default="/tmp/gflowgr_bench")
    p.add_argument(
        "--reuse-stage1",
        default="",
        help="stage-1 checkpoint dir to reuse, '{seed}' is filled in "
        "(grid runs only: its training time is not counted)",
    )
    p.add_argument(
        "--out",
        default=str(RESULTS_DIR / "gflowgr_movies"),
        help="output prefix (.json and .md are written)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the machine is shared: one thread per experiment
    start = time.perf_counter()
    bench = setup(args)
    print(
        f"setup: {bench.timings}; {len(bench.train_rows)} train rows, {len(bench.eval_rows)} {args.split} rows, "
        f"vocab {len(bench.tokenizer)}",
        flush=True,
    )
    rows = []
    for seed in args.seeds:
        rows += run_seed(bench, args, seed)
        write_results(args, bench, rows, time.perf_counter() - start)  # partial results survive a timeout
    write_results(args, bench, rows, time.perf_counter() - start)


def write_results(args, bench: Bench, rows: list[dict], wall: float) -> None:
    """Write <out>.json and <out>.md."""
    rep = bench.ids.usage_report()
    scale = (
        f"{bench.data.num_items} items; {len(bench.train_rows)} train rows (of {len(bench.data.splits['train'])})"
        f", {len(bench.eval_rows)} {args.split} rows; semantic IDs C={args.codebook_size}, L={args.levels}+1 "
        f"(collision rate before the extra level {rep['collision_rate_before']:.3f}); vocab "
        f"{len(bench.tokenizer)}; Qwen2 hidden {args.hidden_size}, {args.num_layers} layers; stage 1 SFT "
        f"{args.sft_steps} steps, stage 2 {args.steps} steps per method, batch {args.batch_size}, lr {args.lr} "
        f"cosine; N={args.num_augmented}; S-DPO lr {args.sdpo_lrs} β {args.sdpo_beta}"
    )
    result = {
        "command": "python " + shlex.join(sys.argv),
        "args": vars(args),
        "versions": versions("trl_flower", "git_commit", "torch", "transformers", "trl", "numpy", "python"),
        "scale": scale,
        "timings": bench.timings,
        "wall_s": wall,
        "summary": summarise(rows),
        "runs": rows,
        # for scale only: another dataset, tokenizer and backbone (bench/paper/gflowgr_letter_beauty.json)
        "paper_letter_beauty": paper_numbers("gflowgr_letter_beauty"),
    }
    spine.write_results(args.out, result, markdown(result), indent=2, final_newline=True)


if __name__ == "__main__":
    main()
