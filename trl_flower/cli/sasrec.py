"""`trl-flower sasrec`: train the SASRec baseline, save it, export per-row logits, report its test metrics.

Writes into ``--output-dir``:

* ``model/`` (``sasrec_config.json`` + ``sasrec_model.pt``, load with `SASRec.from_pretrained`);
* ``{train,valid,test}_logits.npy``: float32 [rows, num_items], row i = CSV row i (the ``preference_scores`` of
  Flower's personalised rewards, D3's guidance and the PPO reward);
* ``train_logits_oof.npy`` with ``--oof-folds K``: out-of-fold logits of the training rows (K extra models);
* ``metrics.json``: settings, training summary (best epoch, best validation NDCG@20, per-epoch log), test metrics
  and, per logits file, how strongly it points at each row's own target (`target_probability_stats`).

Example::

    trl-flower sasrec --data Movies_and_TV --output-dir runs/sasrec_movies
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from trl_flower.cli._parsing import HelpFormatter, report_error

DEFAULT_EPOCHS = 200


@dataclass
class ScriptArguments:
    """Arguments of `trl-flower sasrec` (each field's ``help`` is its command-line help)."""

    data: str = field(
        metadata={
            "help": "Dataset directory with items.tsv and train/valid/test.csv, or a category name such as "
            "Movies_and_TV looked up under --data-root."
        }
    )
    output_dir: str = field(metadata={"help": "Directory for the model, the logits .npy files and metrics.json."})
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "Root holding amazon/<category>/ for category names (default: $TRL_FLOWER_DATA, "
            "else ../shared/data)."
        },
    )
    epochs: int = field(
        default=DEFAULT_EPOCHS,
        metadata={"help": "Maximum epochs (the paper's 200; early stopping usually ends the run much earlier)."},
    )
    patience: int = field(
        default=20, metadata={"help": "Stop after this many epochs without a better validation NDCG@20."}
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=1e-5, metadata={"help": "Adam (L2) weight decay."})
    batch_size: int = field(default=1024, metadata={"help": "Training rows per step."})
    hidden_size: int = field(default=64, metadata={"help": "Embedding / hidden size d."})
    seed: int = field(default=1, metadata={"help": "Seed of initialisation, dropout, shuffling and negatives."})
    device: str = field(default="cpu", metadata={"help": "Torch device, e.g. cpu or cuda."})
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for CPU runs (default: torch's choice)."}
    )
    export_splits: str = field(
        default="train,valid,test",
        metadata={"help": "Comma-separated splits whose per-row logits are saved as <split>_logits.npy ('' = none)."},
    )
    no_progress: bool = field(
        default=False, metadata={"help": "Print one line per epoch instead of the progress bar (logs, batch jobs)."}
    )
    oof_folds: int = field(
        default=0,
        metadata={
            "help": "If >= 2, also write train_logits_oof.npy: out-of-fold logits of the training rows from that "
            "many extra SASRec models, each trained without one fold of the rows (the in-sample train_logits.npy "
            "mostly repeat each row's own target; see docs/tree_and_rewards.md). 0 = skip."
        },
    )


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `TrlParser` over `ScriptArguments` (or the ``sasrec`` subcommand of `subparsers`, a TrlParser's)."""
    from trl import TrlParser

    kwargs = dict(
        description="Train the SASRec baseline (Flower paper's settings), export per-row logits, report test metrics.",
        epilog="example:\n" + __doc__.split("Example::\n\n")[1].split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    if subparsers is not None:
        return subparsers.add_parser("sasrec", help="train the SASRec baseline", **kwargs)
    return TrlParser(ScriptArguments, prog=prog or "trl-flower sasrec", **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, then train, save, export and evaluate; prints the test metrics.

    Argument errors are printed as one line and give exit status 2."""
    try:
        (args,) = make_parser().parse_args_and_config(argv)
        splits = [s for s in args.export_splits.split(",") if s]
        unknown = set(splits) - {"train", "valid", "test"}
        if unknown:
            raise ValueError(f"--export_splits: unknown split(s) {sorted(unknown)}; choose from train, valid, test")
        if args.oof_folds == 1 or args.oof_folds < 0:
            raise ValueError(f"--oof_folds must be 0 (skip) or >= 2, got {args.oof_folds}")
    except ValueError as err:
        return report_error("trl-flower sasrec", err)
    return run(args, splits)


def run(args: ScriptArguments, splits: list[str]) -> int:
    """Train SASRec, save it, export the logits of `splits` and report its test metrics."""
    import json
    import platform
    from pathlib import Path

    import numpy as np
    import torch

    from trl_flower.baselines.sasrec import (
        SASRecTrainingArguments,
        evaluate_sasrec,
        export_split_logits,
        fit_sasrec,
        out_of_fold_logits,
        target_probability_stats,
    )
    from trl_flower.data import load_amazon, popularity_from_histories

    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_amazon(args.data, data_root=args.data_root)
    train_args = SASRecTrainingArguments(
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    model, result = fit_sasrec(data, train_args, hidden_size=args.hidden_size)
    out = Path(args.output_dir)
    model.save_pretrained(out / "model")
    logits = export_split_logits(model, data, out, splits)
    popularity = popularity_from_histories(data.splits["train"]["history_item_title"])
    test = evaluate_sasrec(model, data.splits["test"], data.items, popularity)
    # how strongly each split's logits point at the row's own target (in-sample train rows vs unseen rows)
    targets = {split: data.splits[split]["item_id"] for split in ("train", "valid", "test")}
    diagnostics = {
        f"{split}_logits": target_probability_stats(np.load(path, mmap_mode="r"), targets[split])
        for split, path in logits.items()
    }
    if args.oof_folds:
        logits["train_oof"] = out_of_fold_logits(
            data, out / "train_logits_oof.npy", args.oof_folds, train_args, hidden_size=args.hidden_size
        )
        diagnostics["train_logits_oof"] = target_probability_stats(
            np.load(logits["train_oof"], mmap_mode="r"), targets["train"]
        )
    report = {
        "dataset": data.name,
        "arguments": {f.name: getattr(args, f.name) for f in fields(ScriptArguments)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "training": {
            "best_epoch": result.best_epoch,
            "best_valid_NDCG@20": result.best_valid_ndcg,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "wall_time_s": result.wall_time_s,
            "history": result.history,
        },
        "test": test,
        "logits": {split: str(path) for split, path in logits.items()},
        "target_probability": diagnostics,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    shown = ("HR@5", "NDCG@5", "item_HR@5", "item_NDCG@5", "DGU@10", "MGU@10", "H", "TTR")
    print(
        f"SASRec on {data.name}: best epoch {result.best_epoch} of {result.epochs_run}, "
        f"valid NDCG@20 {result.best_valid_ndcg:.4f}"
    )
    print("test: " + ", ".join(f"{k} {test[k]:.4f}" for k in shown))
    for name, stats in diagnostics.items():
        print(
            f"{name}: mean p(target) {stats['mean_p_target']:.3f}, target in top 10 {stats['target_in_top10']:.3f}, "
            f"first {stats['target_first']:.3f}, entropy {stats['entropy_nats']:.2f} nats ({stats['rows']} rows)"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
