"""Benchmark: time per optimiser step of FlowerTrainer vs plain SFT, side by side in one run, with the step's split.

What is measured (one process, one torch thread unless ``--threads``):

* the same model (a random Qwen2 built here: byte-level BPE trained on the catalogue's titles and prompt text,
  ``--layers`` layers, width ``--hidden``), the same data (the first ``--rows`` training rows of a real Amazon split,
  reference prompts with up to 10 history titles) and the same batch (``--batch`` prompts, no accumulation);
* trainers, each with its own copy of the initial weights and its own AdamW, driven step by step through the
  trainers' own ``training_step`` + optimiser step (what ``Trainer.train`` does per step, minus logging); the Flower
  trainers are built by the library's entry point (`trl_flower.run.build_trainer`):

  - ``sft``: TRL's own ``SFTTrainer`` on prompt/completion pairs (completion = the target title; completion-only
    loss), the yardstick;
  - ``flower_lambda0``: FlowerTrainer with ``flow_lambda=0`` (tested to equal SFTTrainer; nothing is sampled);
  - ``flower``: FlowerTrainer with ``flow_lambda=0.005``, one sampled item per prompt, with the default sampling
    path (``sample_in_loss_step=True``: the prompt runs once with gradient, the item is sampled on a detached copy
    of its KV cache, then target and sample continue on the gradient cache);
  - ``flower_grpo_generate``: the same with ``sample_in_loss_step=False`` (TRL's GRPO ``generate`` path: a separate
    no-grad prefill and decode before the loss step, then the shared-prompt forward with gradient);

* interleaved: every round runs one step of each trainer in turn (order rotated each round), so load from other
  jobs on the shared machine hits all alike; ``--warmup`` rounds are dropped, medians over ``--steps`` rounds are
  reported, and the ratio to ``sft`` is the median of the per-round ratios;
* the split of each step, measured through public interfaces only (PyTorch forward hooks on the model, the
  trainer's ``compute_loss``, the step's own calls), as exclusive wall time: ``sampling`` (model forwards without
  gradient: the decode steps, and ``generate``'s prompt prefill on the generate path), ``forward`` (model forwards
  with gradient), ``targets`` (``training_step`` before ``compute_loss``: batch assembly, i.e. tokenisation, SFT and
  flow targets, GRPO's reward call and logs, and on the generate path the rest of ``generate``), ``loss``
  (``compute_loss`` without its forwards: the loss arithmetic, metrics and, on the in-loss path, the sampler's token
  choice and the samples' flow targets), ``backward`` (``training_step`` after ``compute_loss``) and ``optimizer``
  (AdamW step + scheduler + zero_grad).

Usage::

    python bench/flower_step.py                 # writes bench/results/flower_step.{json,md}
    python bench/flower_step.py --steps 3 --warmup 1 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time
from pathlib import Path

from spine import (
    RESULTS_DIR,
    command,
    git_commit,
    load_average,
    machine,
    use_this_checkout,
    versions,
    write_results,
)

use_this_checkout()  # this checkout's trl_flower, also when another one is installed

PARTS = ["sampling", "targets", "forward", "loss", "backward", "optimizer"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="CDs_and_Vinyl", help="category under $TRL_FLOWER_DATA/amazon or a path")
    p.add_argument("--rows", type=int, default=512, help="first N training rows (the batches cycle through them)")
    p.add_argument("--batch", type=int, default=8, help="prompts per optimiser step (per_device_train_batch_size)")
    p.add_argument("--steps", type=int, default=12, help="measured rounds (one step of every trainer per round)")
    p.add_argument("--warmup", type=int, default=2, help="rounds dropped before measuring")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on titles + prompt text")
    p.add_argument("--flow-lambda", type=float, default=0.005)
    p.add_argument("--runs", nargs="+", default=["sft", "flower_lambda0", "flower", "flower_grpo_generate"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for flower_step.{json,md}")
    return p.parse_args(argv)


class SplitTimer:
    """Exclusive wall time per label (a label's time excludes the labelled spans nested in it)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []  # open spans: [label, start, time of the spans nested in it]

    def reset(self) -> None:
        self.totals = {}

    def open(self, label: str) -> None:
        self.stack.append([label, time.perf_counter(), 0.0])

    def close(self) -> None:
        label, start, nested = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[label] = self.totals.get(label, 0.0) + elapsed - nested
        if self.stack:
            self.stack[-1][2] += elapsed

    @contextlib.contextmanager
    def span(self, label: str):
        self.open(label)
        try:
            yield
        finally:
            self.close()

    def time_forwards(self, model) -> None:
        """Label every forward of `model` (PyTorch forward hooks): ``forward`` with gradient, ``sampling`` without."""
        import torch

        def before(module, args):
            self.open("forward" if torch.is_grad_enabled() else "sampling")

        def after(module, args, output):
            self.close()

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)

    def time_training_step(self, trainer) -> None:
        """Split `trainer`'s ``training_step`` at its public ``compute_loss``: before it ``targets`` (open when the step
        starts), the call itself ``loss``, after it ``backward`` (closed when the step returns)."""
        inner = trainer.compute_loss

        @functools.wraps(inner)
        def compute_loss(*args, **kwargs):
            self.close()  # targets
            with self.span("loss"):
                loss = inner(*args, **kwargs)
            self.open("backward")
            return loss

        trainer.compute_loss = compute_loss


def build_data(args):
    """The training rows with prompts (`trl_flower.run.RunData`), tokenizer, tree and the random model."""
    from trl_flower.data import PromptBuilder, load_amazon
    from trl_flower.run import recommendation_data
    from trl_flower.tiny import build_model, build_tokenizer
    from trl_flower.tree import PrefixTree

    data = load_amazon(args.dataset, splits=["train"])
    # item rewards: training-history counts + 1 (the entry point's default), so every item is reachable
    run_data = recommendation_data(data, PromptBuilder.from_dataset(data.name), max_train_rows=args.rows)
    corpus = list(data.items) + list(run_data.train_dataset["prompt"][:200])
    tokenizer = build_tokenizer(corpus, vocab_size=args.vocab)
    tree = PrefixTree.from_titles(data.items, tokenizer)  # paths end with EOS (default mode)
    model = build_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=args.seed)
    return run_data, tokenizer, tree, model


def make_trainers(args, run_data, tokenizer, tree, model_dir: Path, out_dir: Path) -> dict:
    """TRL's SFTTrainer (the yardstick) and the Flower trainers, built by `trl_flower.run.build_trainer`."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_flower import FlowerConfig
    from trl_flower.run import build_trainer

    common = dict(
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        max_steps=10_000,
        logging_steps=10_000,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=args.seed,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    longest = int(tree.item_length.max())
    rows = run_data.train_dataset
    trainers = {}
    for name in args.runs:
        if name == "sft":
            pairs = Dataset.from_dict(
                {"prompt": rows["prompt"], "completion": [run_data.items[i] for i in rows["item_id"]]}
            )
            trainers[name] = SFTTrainer(
                str(model_dir),
                args=SFTConfig(output_dir=str(out_dir / name), **common),
                train_dataset=pairs,
                processing_class=tokenizer,
            )
            continue
        lam = 0.0 if name == "flower_lambda0" else args.flow_lambda
        config = FlowerConfig(output_dir=str(out_dir / name), flow_lambda=lam, max_completion_length=longest, **common)
        trainer, _ = build_trainer("flower", model_dir, run_data, config, tree=tree, tokenizer=tokenizer)
        trainer.sample_in_loss_step = name != "flower_grpo_generate"  # False: TRL's GRPO `generate` path
        trainers[name] = trainer
    return trainers


class Stepper:
    """One trainer driven step by step: batch → training_step → optimiser step, with the split timers."""

    def __init__(self, name: str, trainer) -> None:
        self.name, self.trainer = name, trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        trainer.model.train()
        self.loader = trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        self.timer = SplitTimer()
        self.timer.time_forwards(trainer.model)
        self.timer.time_training_step(trainer)

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> dict[str, float]:
        tr, timer = self.trainer, self.timer
        batch = self.next_batch()
        timer.reset()
        t0 = time.perf_counter()
        timer.open("targets")  # compute_loss closes it and opens "backward" (SplitTimer.time_training_step)
        tr.training_step(tr.model, batch, None)
        timer.close()  # backward
        with timer.span("optimizer"):
            tr.optimizer.step()
            tr.lr_scheduler.step()
            tr.model.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        split = {k: timer.totals.get(k, 0.0) for k in PARTS}
        split["total"] = total
        return split


def median_split(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    start, machine_before = time.perf_counter(), machine(torch_threads=args.threads)
    run_data, tokenizer, tree, model = build_data(args)
    train = run_data.train_dataset
    tmp = Path(tempfile.mkdtemp(prefix="flower_step_"))
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trainers = make_trainers(args, run_data, tokenizer, tree, model_dir, tmp)
    steppers = [Stepper(name, tr) for name, tr in trainers.items()]

    rounds: dict[str, list[dict]] = {s.name: [] for s in steppers}
    for r in range(args.warmup + args.steps):
        order = steppers[r % len(steppers) :] + steppers[: r % len(steppers)]  # rotate who goes first
        for s in order:
            split = s.step()
            if r >= args.warmup:
                rounds[s.name].append(split)

    prompt_lengths = np.array([len(tokenizer(p)["input_ids"]) for p in train["prompt"]])
    title_lengths = tree.item_length.numpy() if hasattr(tree.item_length, "numpy") else np.asarray(tree.item_length)
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "command": command(argv),
        "git_commit": git_commit(mark_dirty=True),
        "versions": versions("python", "torch", "transformers", "trl", "trl_flower"),
        "machine": machine_before,
        "seed": args.seed,
        "setup": {
            "dataset": run_data.name,
            "rows": len(train),
            "batch": args.batch,
            "gradient_accumulation_steps": 1,
            "num_generations": 1,
            "flow_lambda": args.flow_lambda,
            "flow_loss": "flower_subtb",
            "warmup_rounds": args.warmup,
            "measured_rounds": args.steps,
            "model": f"random Qwen2, {args.layers} layers, hidden {args.hidden}, intermediate {2 * args.hidden}, "
            f"4 heads / 2 KV heads, vocab {len(tokenizer)} (byte-level BPE trained on the titles + 200 "
            f"prompts), tied embeddings, {n_params / 1e6:.1f} M parameters, float32",
            "prompt_tokens_min_mean_max": [
                int(prompt_lengths.min()),
                round(float(prompt_lengths.mean()), 1),
                int(prompt_lengths.max()),
            ],
            "item_path_tokens_min_mean_max": [
                int(title_lengths.min()),
                round(float(title_lengths.mean()), 1),
                int(title_lengths.max()),
            ],
            "tree": repr(tree),
        },
        "runs": {},
    }
    sft_totals = [r["total"] for r in rounds["sft"]] if "sft" in rounds else None
    for name, rows in rounds.items():
        entry = {"median_split_s": median_split(rows), "step_s_all": [round(r["total"], 4) for r in rows]}
        if sft_totals is not None:
            ratios = [r["total"] / s for r, s in zip(rows, sft_totals)]
            entry["ratio_to_sft_median"] = round(statistics.median(ratios), 3)
            entry["ratio_to_sft_all"] = [round(x, 3) for x in ratios]
        if "flower_lambda0" in rounds:
            ratios = [r["total"] / s["total"] for r, s in zip(rows, rounds["flower_lambda0"])]
            entry["ratio_to_flower_lambda0_median"] = round(statistics.median(ratios), 3)
        result["runs"][name] = entry
    result["machine"]["loadavg_1min_after"] = load_average()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_results(Path(args.out) / "flower_step", result, markdown(result), indent=2, final_newline=True)
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Flower step vs SFT step benchmark",
        "",
        f"Command: `{r['command']}` (git {r['git_commit']}, seed {r['seed']}, wall time {r['wall_seconds']} s).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs shared with other jobs, torch threads "
        f"{r['machine']['torch_threads']} (`torch.set_num_threads`), 1-min load average "
        f"{r['machine']['loadavg_1min_before']} before / {r['machine']['loadavg_1min_after']} after.",
        "",
        f"Setup: first {s['rows']} training rows of {s['dataset']}, reference prompts of "
        f"{s['prompt_tokens_min_mean_max'][0]}–{s['prompt_tokens_min_mean_max'][2]} tokens (mean "
        f"{s['prompt_tokens_min_mean_max'][1]}), item paths of {s['item_path_tokens_min_mean_max'][0]}–"
        f"{s['item_path_tokens_min_mean_max'][2]} tokens (mean {s['item_path_tokens_min_mean_max'][1]}, EOS "
        f"included); {s['model']}; {s['tree']}. Batch {s['batch']} prompts, no gradient accumulation, one sample "
        f"per prompt, λ = {s['flow_lambda']}, {s['flow_loss']}. Runs interleaved, one step of each per round, "
        f"{s['warmup_rounds']} warm-up rounds dropped, medians over {s['measured_rounds']} rounds; ratio = median "
        "of the per-round ratios to the SFTTrainer step of the same round.",
        "",
        "| run | s/step | × SFTTrainer | × Flower λ=0 | " + " | ".join(PARTS) + " |",
        "|---|---|---|---|" + "---|" * len(PARTS),
    ]
    for name, e in r["runs"].items():
        m = e["median_split_s"]
        lines.append(
            f"| {name} | {m['total']:.3f} | {e.get('ratio_to_sft_median', float('nan')):.2f} | "
            f"{e.get('ratio_to_flower_lambda0_median', float('nan')):.2f} | "
            + " | ".join(f"{m[k]:.3f}" for k in PARTS)
            + " |"
        )
    lines += [
        "",
        "Split columns: median seconds per step of each part (exclusive wall time, measured through PyTorch forward "
        "hooks and the trainer's `compute_loss`; medians of parts need not add up to the median total). `sampling` "
        "= model forwards without gradient (decode steps; on the generate path also its prompt prefill); `forward` "
        "= model forwards with gradient; `targets` = `training_step` before `compute_loss` (tokenisation, SFT and "
        "flow targets, GRPO's reward call and logs; on the generate path the rest of `generate`); `loss` = "
        "`compute_loss` without its forwards (loss arithmetic and metrics; on the in-loss path also the sampler's "
        "token choice and the samples' flow targets); `backward` = `training_step` after `compute_loss`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
