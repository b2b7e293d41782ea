"""Benchmark: building the PrefixTree at 10k, 100k and 1M items, and tokenising titles.

What is measured (each size in a fresh subprocess, so memory numbers are clean):

* **build**: ``PrefixTree.from_flat(flat, offsets, terminator, item_rewards)`` from pre-tokenised flat arrays (the
  nanoGPT ``prepare.py`` pattern: tokenise once, save, load). Includes path validation, the level-by-level node
  numbering, the flows (log F in float64) and the terminal CSR. Wall time of each repeat.
* **memory**: peak resident-set increase during one build (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``
  right before the build, minus ``VmRSS`` before it; numpy and torch allocations both count), the numpy-only peak
  seen by ``tracemalloc`` in a second build (torch's allocations in ``aggregate_to_nodes`` are invisible to it), and
  the bytes of the finished tree's arrays.
* **first query**: building the cached torch views (``tree.tensors()``) and one batched ``allowed_mask`` of 64 rows.
* **tokenisation** (reported separately): ``title_token_paths`` (fast-tokenizer call + flattening) on real-looking
  titles, with a byte-level BPE trained here on the shared Amazon titles (no hub access; the vocabulary is as large
  as that small corpus allows, far below a real LLM's 150k, which matters little for encoding speed).

Synthetic catalogue (seeded): title lengths log-normal with mean ≈ 6 tokens, clipped to [1, 90] (the reference
trie's CDs titles: mean 6.0, max 92); tokens Zipf-distributed (exponent 1.07) over a 150,000-token vocabulary
(ids permuted, terminator 151645 = Qwen's ``<|im_end|>`` never inside a title); rewards Zipf(2) counts.

Usage::

    python bench/tree_build.py                      # writes bench/results/tree_build.{json,md}
    python bench/tree_build.py --sizes 10000 --repeats 1 --no-tokenize --out /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spine import REPO, RESULTS_DIR, git_commit, versions, write_results  # beside this script: the bench spine

VOCAB = 150_000
TERMINATOR = 151_645
ZIPF_EXPONENT = 1.07


# ---------------------------------------------------------------------- data


def synthetic_catalogue(num_items: int, seed: int):
    """Flat token array, CSR offsets [num_items + 1] (terminator included) and Zipf rewards, all numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sigma = 0.6
    mu = np.log(6.0) - sigma**2 / 2  # mean of the log-normal = 6
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, size=num_items)), 1, 90).astype(np.int64)
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-ZIPF_EXPONENT)
    cdf /= cdf[-1]
    total = int(lengths.sum())
    rank = np.searchsorted(cdf, rng.random(total))  # Zipf ranks by inverse CDF, [total]
    token_of_rank = rng.permutation(VOCAB)  # frequent tokens are not simply the small ids
    title_tokens = token_of_rank[np.minimum(rank, VOCAB - 1)]
    # interleave the terminator after each title: flat = title_1 ⊤ title_2 ⊤ ...
    offsets = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int64)
    is_term = np.zeros(flat.shape[0], dtype=bool)
    is_term[offsets[1:] - 1] = True
    flat[is_term] = TERMINATOR
    flat[~is_term] = title_tokens
    rewards = rng.zipf(2.0, size=num_items).astype(np.float64)
    return flat, offsets, rewards


# ---------------------------------------------------------------------- memory helpers (Linux)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- workers (run in subprocesses)


def worker_generate(num_items: int, seed: int, out_dir: str) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    flat, offsets, rewards = synthetic_catalogue(num_items, seed)
    seconds = time.perf_counter() - t0
    np.save(os.path.join(out_dir, "flat.npy"), flat)
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    np.save(os.path.join(out_dir, "rewards.npy"), rewards)
    lengths = np.diff(offsets) - 1
    return {
        "generate_seconds": round(seconds, 3),
        "title_tokens_mean": round(float(lengths.mean()), 3),
        "title_tokens_max": int(lengths.max()),
        "flat_tokens": int(flat.shape[0]),
    }


def worker_build(data_dir: str, repeats: int) -> dict:
    import tracemalloc

    import numpy as np
    import torch

    from trl_flower.tree import PrefixTree

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    flat = np.load(os.path.join(data_dir, "flat.npy"))
    offsets = np.load(os.path.join(data_dir, "offsets.npy"))
    rewards = np.load(os.path.join(data_dir, "rewards.npy"))
    PrefixTree.from_flat(flat[: offsets[10]], offsets[:11], TERMINATOR, rewards[:10])  # warm up imports/kernels

    # memory: one build with the peak RSS reset just before it
    rss_before = _status_kb("VmRSS")
    peak_ok = _reset_peak()
    tree = PrefixTree.from_flat(flat, offsets, TERMINATOR, item_rewards=rewards)
    rss_peak = _status_kb("VmHWM") if peak_ok else None
    rss_after = _status_kb("VmRSS")
    arrays = [
        tree.parent,
        tree.token,
        tree.depth,
        tree.first_child,
        tree.num_children,
        tree.item_node,
        tree.item_length,
        tree.item_rewards,
        tree.log_flow,
        tree.terminal_items,
        tree.terminal_ptr,
        tree.is_terminal,
    ]
    tree_bytes = sum(a.nbytes for a in arrays)
    num_nodes, max_depth = tree.num_nodes, int(tree.depth.max())
    num_terminals = int(tree.is_terminal.sum())

    t0 = time.perf_counter()
    tree.tensors("cpu")
    tensors_seconds = time.perf_counter() - t0
    nodes = torch.as_tensor(tree.parent[tree.item_node[:64]])  # 64 states just before termination
    t0 = time.perf_counter()
    mask = tree.allowed_mask(nodes, vocab_size=TERMINATOR + 1)
    mask_seconds = time.perf_counter() - t0
    assert bool(mask[:, TERMINATOR].all())
    del tree, mask

    # numpy-only peak via tracemalloc (a separate build: tracing adds overhead, so it is not timed)
    tracemalloc.start()
    tree = PrefixTree.from_flat(flat, offsets, TERMINATOR, item_rewards=rewards)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del tree

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tree = PrefixTree.from_flat(flat, offsets, TERMINATOR, item_rewards=rewards)
        times.append(time.perf_counter() - t0)
        del tree
    mb = 1 / 1024
    return {
        "num_nodes": num_nodes,
        "num_terminals": num_terminals,
        "max_depth": max_depth,
        "build_seconds": [round(t, 3) for t in times],
        "build_seconds_min": round(min(times), 3),
        "rss_before_mb": round(rss_before * mb, 1) if rss_before else None,
        "rss_peak_delta_mb": round((rss_peak - rss_before) * mb, 1) if rss_peak and rss_before else None,
        "rss_retained_delta_mb": round((rss_after - rss_before) * mb, 1) if rss_after and rss_before else None,
        "tracemalloc_numpy_peak_mb": round(traced_peak / 2**20, 1),
        "tree_arrays_mb": round(tree_bytes / 2**20, 1),
        "tensors_first_call_seconds": round(tensors_seconds, 3),
        "allowed_mask_64_rows_seconds": round(mask_seconds, 4),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def worker_tokenize(sizes: list[int], seed: int) -> dict:
    """Time title_token_paths on real-looking titles with a byte-level BPE trained on the shared Amazon titles."""
    import csv

    import numpy as np

    from trl_flower.tiny import build_tokenizer
    from trl_flower.tree import PrefixTree, title_token_paths

    data = Path(os.environ.get("TRL_FLOWER_DATA", REPO.parent / "shared" / "data")) / "amazon"
    real = []
    for path in sorted(data.glob("*/items.tsv")):
        with open(path, newline="") as f:
            real += [row["title"] for row in csv.DictReader(f, delimiter="\t") if row["title"].strip()]
    if not real:
        return {"skipped": f"no titles found under {data}"}
    t0 = time.perf_counter()
    tok = build_tokenizer(real, vocab_size=60_000)
    train_seconds = time.perf_counter() - t0
    # real-looking titles: word counts from the real titles, words from their unigram distribution
    rng = np.random.default_rng(seed)
    words = [t.split() for t in real]
    vocab_words, counts = np.unique(np.concatenate([np.array(w, dtype=object) for w in words]), return_counts=True)
    word_p = counts / counts.sum()
    word_counts = np.array([len(w) for w in words])
    out = {
        "tokenizer": f"byte-level BPE trained on {len(real)} shared Amazon titles (trl_flower.tiny.build_tokenizer)",
        "tokenizer_vocab_size": len(tok),
        "tokenizer_train_seconds": round(train_seconds, 2),
        "sizes": {},
    }
    for n in sizes:
        k = rng.choice(word_counts, size=n)
        picked = rng.choice(len(vocab_words), size=int(k.sum()), p=word_p)
        ends = np.cumsum(k)
        titles = [" ".join(vocab_words[picked[e - c : e]]) for e, c in zip(ends, k)]
        t0 = time.perf_counter()
        flat, offsets, term = title_token_paths(titles, tok)
        tok_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        tree = PrefixTree.from_flat(flat, offsets, term)
        build_seconds = time.perf_counter() - t0
        lengths = np.diff(offsets) - 1
        out["sizes"][str(n)] = {
            "title_token_paths_seconds": round(tok_seconds, 2),
            "build_from_flat_seconds": round(build_seconds, 2),
            "title_tokens_mean": round(float(lengths.mean()), 2),
            "title_tokens_max": int(lengths.max()),
            "num_nodes": tree.num_nodes,
        }
    return out


# ---------------------------------------------------------------------- driver


def _run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "versions": versions("python", "numpy", "torch", "transformers", "tokenizers"),
        "git_commit": git_commit(),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gb": round(mem_gb, 1),
            "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
    }


def _markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# PrefixTree build benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Seed {result['seed']}; git {env['git_commit']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + "  ",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cores']} cores, {env['machine']['memory_gb']} GB RAM, "
        f"load average at start {env['machine']['load_average_at_start']} (cores shared with other jobs: times are "
        "upper bounds).",
        "",
        "Synthetic catalogue: title lengths log-normal, mean ≈ 6 tokens, max 90; Zipf(1.07) tokens over a 150k "
        "vocabulary; Zipf(2) rewards. Built with `PrefixTree.from_flat` from pre-tokenised flat arrays, each size "
        "in its own subprocess.",
        "",
        "| items | title tokens mean / max | nodes | build s min / median | all repeats | peak RSS Δ MB | "
        "tracemalloc peak MB (numpy only) | tree arrays MB | tensors() s | allowed_mask 64 rows s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in result["build"].items():
        lines.append(
            f"| {int(size):,} | {r['title_tokens_mean']} / {r['title_tokens_max']} | {r['num_nodes']:,} | "
            f"{r['build_seconds_min']} / {statistics.median(r['build_seconds']):.3f} | {r['build_seconds']} | "
            f"{r['rss_peak_delta_mb']} | "
            f"{r['tracemalloc_numpy_peak_mb']} | {r['tree_arrays_mb']} | {r['tensors_first_call_seconds']} | "
            f"{r['allowed_mask_64_rows_seconds']} |"
        )
    largest = result["build"][max(result["build"], key=int)]
    lines += [
        "",
        f"Largest size, {int(max(result['build'], key=int)):,} items: {largest['build_seconds_min']} s (slowest repeat "
        f'{max(largest["build_seconds"])} s on the shared cores); the target for 1M items is "well under a minute".',
        "",
        "Peak RSS Δ: `VmHWM` (reset via `/proc/self/clear_refs` just before the build) minus `VmRSS` before it; it "
        "counts numpy and torch memory. tracemalloc sees numpy only (not torch's `aggregate_to_nodes` buffers).",
    ]
    tok = result.get("tokenize")
    if tok:
        lines += ["", "## Tokenisation (separate from the build)", ""]
        if "skipped" in tok:
            lines.append(f"Skipped: {tok['skipped']}")
        else:
            lines += [
                "One-off cost, paid once per catalogue and tokenizer (save the flat arrays; training loads them). "
                "Most of it is the tokenizer itself plus transformers' per-title `BatchEncoding` conversion.",
                "",
                f"Tokenizer: {tok['tokenizer']}, vocabulary {tok['tokenizer_vocab_size']:,} (trained in "
                f"{tok['tokenizer_train_seconds']} s). Titles: word counts and words sampled from the real titles.",
                "",
                "| titles | `title_token_paths` s | tokens mean / max | `from_flat` s | nodes |",
                "|---|---|---|---|---|",
            ]
            for n, r in tok["sizes"].items():
                lines.append(
                    f"| {int(n):,} | {r['title_token_paths_seconds']} | {r['title_tokens_mean']} / "
                    f"{r['title_tokens_max']} | {r['build_from_flat_seconds']} | {r['num_nodes']:,} |"
                )
    return "\n".join(lines) + "\n"


def _write(result: dict, out: Path) -> None:
    json_path, md_path = write_results(out, result, _markdown(result), indent=2, final_newline=True)
    print(f"wrote {json_path} and {md_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="timed builds per size (after one memory build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenize-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--no-tokenize", action="store_true", help="skip the tokenisation benchmark")
    parser.add_argument("--out", default=str(RESULTS_DIR / "tree_build"), help="output path stem")
    parser.add_argument("--worker", choices=["generate", "build", "tokenize"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "generate":
        print(json.dumps(worker_generate(args.sizes[0], args.seed, args.data_dir)))
        return
    if args.worker == "build":
        print(json.dumps(worker_build(args.data_dir, args.repeats)))
        return
    if args.worker == "tokenize":
        print(json.dumps(worker_tokenize(args.tokenize_sizes, args.seed)))
        return

    command = "python bench/tree_build.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {"command": command.strip(), "seed": args.seed, "environment": _environment(), "build": {}}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            gen_args = ["--worker", "generate", "--sizes", str(size), "--seed", str(args.seed), "--data-dir", tmp]
            gen = _run_worker(gen_args)
            build = _run_worker(["--worker", "build", "--repeats", str(args.repeats), "--data-dir", tmp])
        result["build"][str(size)] = {**gen, **build}
        print(
            f"{size:>9,} items: build {build['build_seconds_min']} s, peak RSS Δ {build['rss_peak_delta_mb']} MB, "
            f"{build['num_nodes']:,} nodes",
            flush=True,
        )
    if not args.no_tokenize:
        sizes = [str(n) for n in args.tokenize_sizes]
        result["tokenize"] = _run_worker(["--worker", "tokenize", "--tokenize-sizes", *sizes, "--seed", str(args.seed)])
        print("tokenize:", json.dumps(result["tokenize"].get("sizes", result["tokenize"])), flush=True)
    _write(result, Path(args.out))


if __name__ == "__main__":
    main()
