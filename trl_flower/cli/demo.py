"""``trl-flower demo``: SFT vs Flower on the built-in synthetic catalogue, on CPU, in a few minutes, no download.

Steps (each reported with its wall time):

1. **Data**: `trl_flower.data.synthetic.make_synthetic` (Zipf popularity, genre Markov chain, chronological 8:1:1
   split, in the Amazon loader's form); popularity groups and their interaction shares from the training histories.
2. **Model**: a byte-level BPE tokenizer trained on the catalogue's titles and prompt text and a small Qwen2 built
   from it (`trl_flower.tiny`), or any local causal LM directory (``--model``). Prompts are the paper's text
   (`trl_flower.data.prompts`) in chat mode when the tokenizer has a chat template; the title-after-prompt
   tokenisation is checked before training.
3. **Training**: SFT and Flower from the same initial weights, on the same rows, batches, steps and seed. SFT is
   `FlowerTrainer` with ``flow_lambda = 0``; Flower adds λ·SubTB on trie-constrained on-policy samples with the
   training-history interaction counts as item rewards.
4. **Evaluation**: top-K recommendations by trie-constrained beam search (`trl_flower.evaluation.recommend`) on the
   evaluation split (``test``; tune on ``valid``), the paper's metrics (HR/NDCG@K, DGU/MGU@K, H, TTR, distinct
   items), and a most-popular baseline for scale.
5. **Report**: a table on stdout, and ``report.json``, ``report.md`` and ``group_shares.png`` (popularity-group
   shares of the recommendations of SFT and Flower against the data, as in the paper's Figure 2) in
   ``--output-dir``, plus the two trained checkpoints (``sft/``, ``flower/``), which are plain Hugging Face model
   directories with the prefix tree beside the weights (`trl_flower.checkpoint`) and a model card; both runs are
   built through `trl_flower.run.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_flower.cli._parsing import HelpFormatter, report_error

DEFAULT_OUTPUT_DIR = "./trl-flower-demo"
CATEGORY = "musics"  # the synthetic catalogue is music-like (genres); the paper's CDs category words


@dataclass
class DemoArguments:
    """Options of ``trl-flower demo``; each field's ``help`` is its command-line help."""

    output_dir: str = field(
        default=DEFAULT_OUTPUT_DIR,
        metadata={"help": "Where the report (report.json, report.md, group_shares.png) and checkpoints go."},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "A local causal LM directory (weights + tokenizer) to fine-tune instead of the tiny model built "
            "from scratch. Its tokenizer must tokenise titles the same way after the prompt as alone."
        },
    )
    num_items: int = field(default=300, metadata={"help": "Items in the synthetic catalogue."})
    num_users: int = field(
        default=600, metadata={"help": "Simulated users; rows are about 9 per user, split 8:1:1 by time."}
    )
    epochs: float = field(default=2.0, metadata={"help": "Training epochs over the train split (both models)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: optimisation steps per model, overriding --epochs."})
    flow_lambda: float = field(
        default=0.005,
        metadata={"help": "λ of Flower's loss (1 − λ)·SFT + λ·SubTB; the SFT run uses λ = 0."},
    )
    flow_loss: str = field(
        default="flower_subtb",
        metadata={
            "help": "Flower's flow-balance loss: flower_subtb (the paper's modified SubTB), db, tb or "
            "full_distribution "
            "(see docs/trainer.md)."
        },
    )
    title_log_term: str = field(
        default="official",
        metadata={
            "help": "Termination target at a complete title passed on the way to a longer one: official (the "
            "e^-15 constant) or flow (that title's own R/F); see docs/trainer.md."
        },
    )
    flow_policy_support: str = field(
        default="vocabulary",
        metadata={
            "help": "Match the flow ratios with π over the whole vocabulary (official) or renormalised over the "
            "tree's children (tree); see docs/trainer.md."
        },
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (linear decay), both models."})
    batch_size: int = field(default=32, metadata={"help": "Training rows per optimisation step."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear learning-rate warm-up steps (both models)."})
    logging_steps: int = field(default=50, metadata={"help": "Print the training losses every N steps."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the tiny model (ignored with --model)."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers of the tiny model (ignored with --model)."})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary of the tiny model (ignored with --model)."})
    top_k: int = field(default=10, metadata={"help": "K: recommendations per user (beam search with K beams)."})
    eval_split: str = field(
        default="test", metadata={"help": "Split to evaluate: 'test' for the report, 'valid' to tune settings."}
    )
    eval_rows: int = field(default=0, metadata={"help": "If > 0: evaluate only the first N rows of the split."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per beam-search call."})
    seed: int = field(default=0, metadata={"help": "Seed of the data, the initial weights and training."})
    num_threads: int = field(
        default=0,
        metadata={
            "help": "PyTorch CPU threads; 0 = auto: the number of cores minus the current load (at least 1), because "
            "OpenMP threads that compete with other processes for a core slow the tiny model down several-fold."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "A seconds-long smoke run (tiny data, model and budget) for tests; numbers are meaningless."},
    )

    def __post_init__(self) -> None:
        if self.eval_split not in ("valid", "test"):
            raise ValueError(f"--eval-split must be 'valid' or 'test', got {self.eval_split!r}")
        if not 0.0 <= self.flow_lambda <= 1.0:
            raise ValueError(f"--flow-lambda must lie in [0, 1] (loss = (1 − λ)·SFT + λ·SubTB), got {self.flow_lambda}")
        if self.num_threads < 0:
            raise ValueError(f"--num-threads must be >= 0 (0: automatic), got {self.num_threads}")
        for name in ("num_items", "num_users", "batch_size", "top_k", "eval_batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.quick:  # every size shrinks; explicit --max-steps / --eval-rows still win
            self.num_items, self.num_users = min(self.num_items, 48), min(self.num_users, 60)
            self.hidden_size, self.num_layers, self.vocab_size = 32, 1, min(self.vocab_size, 400)
            self.batch_size = min(self.batch_size, 8)
            self.max_steps = self.max_steps if self.max_steps > 0 else 3
            self.eval_rows = self.eval_rows or 12
            self.top_k = min(self.top_k, 5)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `TrlParser` over `DemoArguments` (or the ``demo`` subcommand of `subparsers`, a TrlParser's)."""
    from trl import TrlParser

    kwargs = dict(
        description="Train SFT and Flower side by side on a built-in synthetic catalogue (no download) and report "
        "accuracy (HR/NDCG@K), popularity-group fairness against the data (DGU/MGU), and diversity, with a plot.",
        formatter_class=HelpFormatter,
    )
    if subparsers is not None:
        return subparsers.add_parser("demo", help="SFT vs Flower on a built-in synthetic catalogue", **kwargs)
    return TrlParser(DemoArguments, prog=prog or "trl-flower demo", **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the demo; argument errors are printed as one line and give exit status 2."""
    try:
        (cfg,) = make_parser().parse_args_and_config(argv)
    except ValueError as err:
        return report_error("trl-flower demo", err)
    _quiet_libraries()
    report = run_demo(cfg)
    print()
    print(format_summary(report))
    return 0


def _quiet_libraries() -> None:
    """Keep the console to the demo's stages, the training and beam-search progress bars and the report."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()  # dataset.map bars
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" (not Trainer's)
    transformers.utils.logging.set_verbosity_error()
    for message in (
        "'pin_memory' argument is set as true",
        "`is_gradient_checkpointing` is deprecated",
        "`gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)


# --------------------------------------------------------------------------------------------------------- pipeline


def run_demo(cfg: DemoArguments) -> dict[str, Any]:
    """Build data and model, train SFT and Flower, evaluate both, write the report; returns the report dict."""
    import torch

    from trl_flower.data.popularity import popularity_from_histories
    from trl_flower.data.synthetic import make_synthetic
    from trl_flower.evaluation.report import write_report
    from trl_flower.run import recommendation_data
    from trl_flower.tree import PrefixTree

    start = time.time()
    timing: dict[str, float] = {}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads or auto_num_threads())

    _stage(
        "data",
        f"synthetic catalogue: {cfg.num_items} items, {cfg.num_users} users (seed {cfg.seed}); "
        f"{torch.get_num_threads()} CPU thread(s)",
    )
    data = make_synthetic(cfg.num_items, cfg.num_users, seed=cfg.seed)
    popularity = popularity_from_histories(data.splits["train"]["history_item_title"])
    timing["data"] = time.time() - start

    t = time.time()
    tokenizer, init_dir, builder = _prepare_model(cfg, data, out)
    eval_tree = PrefixTree.from_titles(data.items, tokenizer)
    # prompts, item counts (Flower's item rewards: counts in training histories + 1) and popularity groups
    run_data = recommendation_data(data, builder)
    eval_split = data.splits[cfg.eval_split]
    if cfg.eval_rows > 0:
        eval_split = eval_split.select(range(min(cfg.eval_rows, eval_split.num_rows)))
    eval_prompts = [builder(h) for h in eval_split["history_item_title"]]
    timing["model"] = time.time() - t

    labels = {"popularity": "Most popular", "sft": "SFT (λ = 0)", "flower": f"Flower (λ = {cfg.flow_lambda:g})"}
    results: dict[str, dict[str, Any]] = {}
    shares: dict[str, list[float]] = {}
    results[labels["popularity"]], shares[labels["popularity"]] = _evaluate_titles(
        _most_popular(run_data.counts(), data.items, cfg.top_k, len(eval_prompts)), eval_split, popularity, data.items
    )
    for name, lam in (("sft", 0.0), ("flower", cfg.flow_lambda)):
        t = time.time()
        _stage(name, f"training {labels[name]} from {init_dir}")
        model = _train(lam, cfg, init_dir, tokenizer, eval_tree, run_data, out / name)
        timing[f"train_{name}"] = time.time() - t
        t = time.time()
        _stage(name, f"constrained beam search on {len(eval_prompts)} {cfg.eval_split} rows (K = {cfg.top_k})")
        results[labels[name]], shares[labels[name]] = _evaluate_model(
            model, tokenizer, eval_prompts, eval_tree, eval_split, popularity, data, cfg
        )
        timing[f"eval_{name}"] = time.time() - t
        del model

    timing["total"] = time.time() - start
    metadata = {
        "command": "trl-flower demo " + " ".join(_command_line(cfg)),
        "settings": dataclasses.asdict(cfg),
        "data": {
            "num_items": data.num_items,
            "train_rows": data.splits["train"].num_rows,
            "valid_rows": data.splits["valid"].num_rows,
            "test_rows": data.splits["test"].num_rows,
            "eval_split": cfg.eval_split,
            "eval_rows": eval_split.num_rows,
        },
        "checkpoints": {"sft": str(out / "sft"), "flower": str(out / "flower")},
        "threads": torch.get_num_threads(),
        "wall_time_s": {k: round(v, 1) for k, v in timing.items()},
    }
    title = f"trl-flower demo: SFT vs Flower on the synthetic catalogue ({cfg.eval_split} split)"
    files = write_report(
        results,
        out,
        title,
        group_shares=shares,
        reference_shares=popularity.shares.tolist(),
        reference_label="data (train histories)",
        metadata=metadata,
        columns=table_columns(cfg.top_k, results),
        stem="report",
    )
    return {
        "title": title,
        "results": results,
        "group_shares": shares,
        "reference_shares": popularity.shares.tolist(),
        **metadata,
        "files": {k: str(v) for k, v in files.items()},
    }


def _command_line(cfg: DemoArguments) -> list[str]:
    """The options that differ from the defaults, as command-line flags."""
    defaults = DemoArguments(quick=cfg.quick)  # --quick changes several defaults itself
    flags = []
    for f in dataclasses.fields(DemoArguments):
        value = getattr(cfg, f.name)
        if f.name == "quick" or value == getattr(defaults, f.name):
            continue
        flags.append("--" + f.name.replace("_", "-") + ("" if isinstance(value, bool) else f" {value}"))
    return (["--quick"] if cfg.quick else []) + flags


def auto_num_threads() -> int:
    """CPU cores not busy with other work: ``cores - round(1-minute load average)``, at least 1."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, cores - busy)


def _stage(name: str, message: str) -> None:
    print(f"[demo:{name}] {message}", flush=True)


def _prepare_model(cfg: DemoArguments, data, out: Path):
    """Tokenizer, the initial model directory (shared by SFT and Flower), and the prompt builder."""
    from transformers import AutoTokenizer

    from trl_flower.data.prompts import PromptBuilder, check_prompt_tokenization
    from trl_flower.tiny import build_model, build_tokenizer

    if cfg.model is None:
        raw = PromptBuilder(category=CATEGORY)
        text = [raw.user_message(h) for h in data.splits["train"]["history_item_title"][:400]]
        tokenizer = build_tokenizer(list(data.items) * 3 + text, vocab_size=cfg.vocab_size)
        model = build_model(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
        init_dir = out / "init"
        model.save_pretrained(init_dir)  # TRL reloads models from a path: save the shared initial weights once
        tokenizer.save_pretrained(init_dir)
        n_params = sum(p.numel() for p in model.parameters())
        _stage(
            "model",
            f"tiny Qwen2: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {len(tokenizer)}, "
            f"{n_params / 1e6:.2f} M parameters -> {init_dir}",
        )
    else:
        init_dir = Path(cfg.model)
        if not (init_dir / "config.json").is_file():
            raise FileNotFoundError(f"--model {init_dir} is not a local model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(init_dir, padding_side="left")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _stage("model", f"--model {init_dir}")
    mode = "chat" if getattr(tokenizer, "chat_template", None) else "reference"
    builder = PromptBuilder(category=CATEGORY, mode=mode, tokenizer=tokenizer if mode == "chat" else None)
    sample = [builder(h) for h in data.splits["train"]["history_item_title"][:3]]
    check_prompt_tokenization(tokenizer, sample, data.items, tokenizer.eos_token_id)
    return tokenizer, init_dir, builder


def _train(flow_lambda: float, cfg: DemoArguments, init_dir: Path, tokenizer, tree, run_data, out: Path):
    """Train one model from `init_dir` through `trl_flower.run.train` and save the run to `out`; return the model.

    Both runs share everything (initial weights, rows, batch order, steps, learning rate, seed) except λ: with
    λ = 0 `FlowerTrainer` samples nothing and is plain SFT on the target's tree path.
    """
    from trl_flower.config import FlowerConfig
    from trl_flower.run import train

    args = FlowerConfig(
        output_dir=str(out),
        flow_lambda=flow_lambda,
        flow_loss=cfg.flow_loss,
        title_log_term=cfg.title_log_term,
        flow_policy_support=cfg.flow_policy_support,
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        max_completion_length=int(tree.item_length.max()),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=False,
        logging_steps=max(1, cfg.logging_steps),
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    return train("flower", init_dir, run_data, args, tree=tree, tokenizer=tokenizer).model


def _evaluate_model(model, tokenizer, prompts, tree, split, popularity, data, cfg: DemoArguments):
    """(metrics, group shares) of `model`'s top-K lists by trie-constrained beam search."""
    from trl_flower.evaluation.recommend import recommend

    model.eval()
    rec = recommend(
        model,
        tokenizer,
        prompts,
        tree,
        top_k=cfg.top_k,
        batch_size=cfg.eval_batch_size,
        titles=data.items,
        show_progress=True,
        decoder="trie",  # the trie beam search (docs/decoding.md): the generate path's lists, faster
    )
    return _evaluate_titles(rec.titles, split, popularity, data.items)


def _evaluate_titles(titles, split, popularity, items) -> tuple[dict[str, Any], list[float]]:
    """(the paper's metrics, popularity-group shares @K) of a [U, K] title matrix."""
    from trl_flower.evaluation.metrics import group_fairness_at_k, recommendation_metrics

    K = len(titles[0])
    metrics = recommendation_metrics(
        titles, split["item_title"], popularity, items, ks=sorted({1, 5, K}), fairness_ks=(K,)
    )
    shares = group_fairness_at_k(titles, popularity, items, ks=(K,))[f"group_shares@{K}"]
    return metrics, shares


def _most_popular(counts, items, k: int, num_rows: int) -> list[list[str]]:
    """The K most interacted titles (training histories) for every row: the popularity baseline."""
    by_title: dict[str, float] = {}
    for item, c in enumerate(counts.tolist()):
        by_title[items[item]] = by_title.get(items[item], 0.0) + c
    top = sorted(by_title, key=lambda t: -by_title[t])[:k]  # stable: ties keep catalogue order
    return [list(top) for _ in range(num_rows)]


# --------------------------------------------------------------------------------------------------------- report

TABLE_COLUMNS = ("HR@10", "NDCG@10", "HR@5", "NDCG@5", "DGU@10", "MGU@10", "distinct_titles", "H", "TTR", "invalid")
"""The summary's metric rows (@10 becomes @K for another --top-k)."""


def table_columns(K: int, results: dict[str, dict[str, Any]]) -> list[str]:
    """`TABLE_COLUMNS` at cut-off K, without duplicates and without metrics no method has."""
    columns = [c.replace("@10", f"@{K}") for c in TABLE_COLUMNS]
    return list(dict.fromkeys(c for c in columns if any(c in m for m in results.values())))


def format_summary(report: dict[str, Any]) -> str:
    """The console summary: metrics table, group-share table, where the files are, and the wall time."""
    from trl_flower.evaluation.report import group_shares_table, markdown_table

    K = report["settings"]["top_k"]
    return "\n".join(
        [
            report["title"],
            "",
            markdown_table(report["results"], table_columns(K, report["results"])),
            "",
            f"Popularity-group shares of the top-{K} lists (G1 = most popular); "
            "DGU/MGU measure the distance to the data:",
            group_shares_table(report["group_shares"], report["reference_shares"], "data (train histories)"),
            "",
            f"Report: {report['files']['markdown']}  (JSON: {report['files']['json']}, plot: "
            f"{report['files'].get('group_shares_plot')}); checkpoints: {report['checkpoints']['sft']}, "
            f"{report['checkpoints']['flower']}",
            f"Wall time: {report['wall_time_s']['total']:.0f} s",
        ]
    )
