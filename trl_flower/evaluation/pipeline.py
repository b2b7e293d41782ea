"""The evaluation of a saved run, as `trl-flower evaluate` runs it: the library call behind the command.

:func:`run_evaluation` takes an :class:`EvaluateArguments` (the command's options, each field's ``help`` is its
command-line help) and returns the metrics, the report's files and the recommendations::

    from trl_flower.evaluation.pipeline import EvaluateArguments, check_arguments, run_evaluation

    args = EvaluateArguments(model="out/flower", data="Movies_and_TV", max_rows=500, output_dir="eval/flower")
    check_arguments(args)  # cheap checks before anything is loaded
    result = run_evaluation(args)  # {"metrics", "group_shares", "table", "files", "recommendations", "metadata"}

Task ``recommend`` (flower_reference.md §3.1-3.2): the paper's prompt for every row of the split (its history),
trie-constrained beam search over all catalogue items (`trl_flower.evaluation.recommend.recommend`, or D3's
`recommend_d3`), the paper's metrics and the group-share plot. Task ``distribution`` (§3.3): the history-free prompt,
constrained samples over the target's titles (`sample_items`), the divergences and the item-frequency plot. The tree
is the run's own (`trl_flower.checkpoint.catalogue_tree`). :func:`command_line` gives the `trl-flower evaluate`
command that reproduces a set of arguments (it is recorded in ``metrics.json``). Torch and transformers are imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trl_flower.data.prompts import check_category
from trl_flower.data.targets import load_target

__all__ = [
    "DECODERS",
    "DECODINGS",
    "EVAL_SPLITS",
    "OFFICIAL_JSON",
    "PROMPT_MODES",
    "TASKS",
    "EvaluateArguments",
    "catalogue_tree",
    "check_arguments",
    "check_decoding",
    "check_max_new_tokens",
    "command_line",
    "history_free",
    "run_evaluation",
]

TASKS = ("recommend", "distribution")
PROMPT_MODES = ("reference", "chat")
DECODINGS = ("beam", "temp", "d3")
DECODERS = ("trie", "generate")  # = trl_flower.evaluation.recommend.DECODERS (a test checks it)
EVAL_SPLITS = ("train", "valid", "test")
OFFICIAL_JSON = "predictions.json"


@dataclass
class EvaluateArguments:
    """Options of `trl-flower evaluate` (each field's ``help`` is the command-line help)."""

    model: str = field(
        metadata={
            "help": "Local model directory (weights, config and tokenizer; a trained "
            "FlowerTrainer output also holds the prefix tree)."
        }
    )
    task: str = field(
        default="recommend",
        metadata={
            "help": "'recommend': top-K beam search on a data split, the paper's Table 4 metrics. "
            "'distribution': history-free constrained sampling against --target, Table 3 metrics.",
            "choices": TASKS,
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Dataset for --task recommend: a category name under <data-root>/amazon/ "
            "(Movies_and_TV, CDs_and_Vinyl) or a directory with items.tsv and train/valid/test.csv."
        },
    )
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "Root holding amazon/<category>/ and movies_popularity/ (default: $TRL_FLOWER_DATA, "
            "else ../shared/data)."
        },
    )
    split: str = field(default="test", metadata={"help": "Split whose rows are evaluated.", "choices": EVAL_SPLITS})
    max_rows: int = field(
        default=0,
        metadata={
            "help": "Evaluate only N rows of the split (the first N, or a random "
            "sample with --row-sample-seed); 0 = all."
        },
    )
    row_sample_seed: int | None = field(
        default=None,
        metadata={
            "help": "With --max-rows: evaluate a random sample of N rows drawn with this seed "
            "instead of the first N (the splits are sorted by time, so the first rows are "
            "not a fair sample).",
        },
    )
    top_k: int = field(default=10, metadata={"help": "K: recommendations per row (num_return_sequences)."})
    num_beams: int | None = field(default=None, metadata={"help": "Beams per row, >= K (default: K, as the paper)."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per generate call: prompts for beam search (each with num_beams beams; default 16), "
            "samples for --task distribution (default 64). Results do not depend on it.",
        },
    )
    length_penalty: float = field(
        default=1.0, metadata={"help": "Beam score = sum of log-probs / length ** this (paper 1.0; D3 uses 0.0)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Decoding temperature (beam search: the 'Temp' baseline; sampling: T)."}
    )
    decoding: str = field(
        default="beam",
        metadata={
            "help": "Beam-search variant for --task recommend: 'beam' (the paper's decoding), 'temp' (the "
            "Temp baseline: needs --temperature != 1, paper 1.5), 'd3' (D3: length penalty 0 plus "
            "SASRec guidance; needs --sasrec-logits and --guidance-scale).",
            "choices": DECODINGS,
        },
    )
    decoder: str = field(
        default="trie",
        metadata={
            "help": "Beam-search engine for --task recommend (every --decoding runs on it): 'trie', our trie beam "
            "search (it scores only the allowed children, never a [rows x vocabulary] tensor), or 'generate', "
            "transformers' generate with the trie logits processor, the reference the trie engine is tested "
            "against. Both give the same top-K lists (docs/decoding.md); 'generate' is slower.",
            "choices": DECODERS,
        },
    )
    sasrec_logits: str | None = field(
        default=None,
        metadata={
            "help": "--decoding d3: SASRec logits of the evaluated split (.npy [split rows, items], e.g. "
            "test_logits.npy of `trl-flower sasrec`); row = the CSV row of the split."
        },
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "--decoding d3: guidance g in g*(score - cf) + cf. 1 = no guidance (the official script's "
            "default, which makes D3 only the length-penalty removal); < 1 moves towards SASRec.",
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Decoding budget (default: the longest item path, so every title can end)."},
    )
    prompt_mode: str = field(
        default="reference",
        metadata={
            "help": "'reference': the paper's plain-text prompt (base models). 'chat': the same text as a user "
            "message through the tokenizer's chat template (instruct models).",
            "choices": PROMPT_MODES,
        },
    )
    category: str | None = field(
        default=None,
        metadata={
            "help": "Category words in the prompt, e.g. 'books' (default: from the dataset name: Movies_and_TV "
            "-> 'movies and TV', CDs_and_Vinyl -> 'musics', Video_Games -> 'video games')."
        },
    )
    tree: str | None = field(
        default=None,
        metadata={
            "help": "A PrefixTree .npz to decode with (default: the tree saved in --model; a model without one "
            "needs --rebuild-tree)."
        },
    )
    rebuild_tree: bool = field(
        default=False,
        metadata={
            "help": "Build the tree from the catalogue titles with the model's tokenizer and EOS terminator "
            "(needed for a model without a saved tree; ignores a saved one)."
        },
    )
    target: str | None = field(
        default=None,
        metadata={
            "help": "Target distribution for --task distribution: a JSON file {title: count}, or the name of "
            "one in the data root's movies_popularity folder (movies_100.json, movies_1500.json)."
        },
    )
    num_samples: int = field(
        default=2000, metadata={"help": "Constrained samples for --task distribution (paper: 2000)."}
    )
    item_noun: str = field(
        default="movie", metadata={"help": "Item noun of the history-free prompt ('Please recommend a movie ...')."}
    )
    response_space: bool = field(
        default=False,
        metadata={
            "help": "History-free prompt ends '### Response: \\n' (the SFT/DPO/PPO baselines of RQ1) instead "
            "of '### Response:\\n' (the GFlowNet runs)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Torch seed (sampling draws; beam search is deterministic)."})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."})
    num_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch; 0 = torch's default (tiny models: 1 is often fastest)."}
    )
    label: str | None = field(
        default=None, metadata={"help": "Name of the model in the report (default: the model directory's name)."}
    )
    output_dir: str = field(
        default="trl-flower-eval", metadata={"help": "Where metrics.json, metrics.md and the plots are written."}
    )
    export_official_json: bool = field(
        default=False,
        metadata={
            "help": f"Also write {OFFICIAL_JSON}: per row the K titles ('predict'), the target ('output'), "
            "the beam scores and the prompt, readable by the authors' calc.py."
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar and stage messages."})


def command_line(args: EvaluateArguments) -> str:
    """The `trl-flower evaluate` command that reproduces ``args`` (options at their default are left out)."""
    parts = ["trl-flower", "evaluate"]
    for f in fields(EvaluateArguments):
        value = getattr(args, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        parts += [flag] if isinstance(value, bool) else [flag, str(value)]
    return shlex.join(parts)


def check_arguments(args: EvaluateArguments) -> None:
    """Cheap checks before anything is loaded. Raises ValueError/FileNotFoundError with the option and the fix."""
    from trl_flower.checkpoint import is_model_dir

    model = Path(args.model).expanduser()
    if not model.exists():
        raise FileNotFoundError(f"--model {args.model}: no such directory; pass a local model directory")
    if not is_model_dir(model):
        raise FileNotFoundError(
            f"--model {args.model}: no config.json (or adapter_config.json) in it; pass a Hugging Face model "
            "directory (save_pretrained output, e.g. a `trl-flower train` run)"
        )
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {args.task!r}")
    if args.prompt_mode not in PROMPT_MODES:
        raise ValueError(f"--prompt-mode must be one of {PROMPT_MODES}, got {args.prompt_mode!r}")
    if args.split not in EVAL_SPLITS:
        raise ValueError(f"--split must be one of {EVAL_SPLITS}, got {args.split!r}")
    if args.task == "recommend":
        if args.data is None:
            raise ValueError("--task recommend needs --data (a category name such as Movies_and_TV or a dataset dir)")
        if args.target is not None:
            raise ValueError("--target is only used with --task distribution")
        check_category(args.data, args.category, "--data")
    else:
        if args.target is None:
            raise ValueError("--task distribution needs --target (a {title: count} JSON, e.g. movies_100.json)")
        if args.data is not None or args.export_official_json:
            raise ValueError("--data and --export-official-json are only used with --task recommend; drop them")
    positive = {
        "top_k": args.top_k,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_beams is not None and args.num_beams < args.top_k:
        raise ValueError(f"--num-beams must be >= --top-k ({args.top_k}), got {args.num_beams}")
    if args.max_rows < 0 or args.num_threads < 0:
        raise ValueError("--max-rows and --num-threads must be >= 0 (0 = all rows / torch's default)")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.tree is not None and args.rebuild_tree:
        raise ValueError("--tree and --rebuild-tree contradict each other; give one")
    check_decoding(args)


def check_decoding(args: EvaluateArguments) -> None:
    """The --decoding variant, the --decoder engine and their options agree (see the field helps)."""
    if args.decoding not in DECODINGS:
        raise ValueError(f"--decoding must be one of {DECODINGS}, got {args.decoding!r}")
    if args.decoder not in DECODERS:
        raise ValueError(f"--decoder must be one of {DECODERS}, got {args.decoder!r}")
    if args.decoder != "trie" and args.task != "recommend":
        raise ValueError(
            f"--decoder {args.decoder} picks the beam-search engine of --task recommend; --task distribution "
            "samples with generate always, so drop --decoder"
        )
    if args.decoding != "beam" and args.task != "recommend":
        raise ValueError(f"--decoding {args.decoding} is a beam-search variant; use it with --task recommend")
    if args.decoding == "temp" and args.temperature == 1.0:
        raise ValueError("--decoding temp needs --temperature != 1 (the paper tunes 1.2, 1.5, 2.0)")
    if args.decoding == "d3":
        if args.sasrec_logits is None or args.guidance_scale is None:
            raise ValueError(
                "--decoding d3 needs --sasrec-logits (the split's SASRec logits .npy) and "
                "--guidance-scale (1 = the official script's no-op guidance, < 1 follows SASRec more)"
            )
        if not Path(args.sasrec_logits).expanduser().is_file():
            raise FileNotFoundError(f"--sasrec-logits {args.sasrec_logits}: no such file")
        if args.guidance_scale < 0:
            raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
        if args.length_penalty not in (0.0, 1.0):
            raise ValueError("--decoding d3 decodes with length penalty 0; drop --length-penalty")
    elif args.sasrec_logits is not None or args.guidance_scale is not None:
        raise ValueError("--sasrec-logits and --guidance-scale are only used with --decoding d3; drop them")


# ----------------------------------------------------------------------------------------------------- pipeline


class _Stages:
    """Wall time per stage, with an optional one-line message on stderr when a stage starts."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn, *fn_args, **fn_kwargs):
        if self.verbose:
            print(f"[evaluate] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn(*fn_args, **fn_kwargs)
        self.times[name] = round(time.perf_counter() - t0, 3)
        return out

    def total(self) -> dict[str, float]:
        return {**self.times, "total": round(time.perf_counter() - self.start, 3)}


def run_evaluation(args: EvaluateArguments) -> dict[str, Any]:
    """The whole evaluation (after `check_arguments`); returns ``{"metrics", "table", "files", ...}``."""
    import torch

    stages = _Stages(verbose=not args.no_progress)
    saved_threads = torch.get_num_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    try:
        if args.task == "recommend":
            return _run_recommend(args, stages)
        return _run_distribution(args, stages)
    finally:
        torch.set_num_threads(saved_threads)  # callers in the same process keep their setting


def _load_model(args: EvaluateArguments):
    import torch
    from transformers.utils import logging as hf_logging

    from trl_flower.checkpoint import load_model
    from trl_flower.evaluation.sharding import process_device

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = process_device(device)  # one GPU per process under a multi-process launch
    bars = hf_logging.is_progress_bar_enabled()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        model, tokenizer = load_model(args.model, device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer, str(device)


def catalogue_tree(args: EvaluateArguments, titles: list[str], tokenizer, record: dict[str, Any]):
    """The prefix tree to decode with and where it came from (`trl_flower.checkpoint.catalogue_tree` with
    ``--tree`` / ``--rebuild-tree``)."""
    from trl_flower.checkpoint import catalogue_tree as saved_or_built_tree

    tree, source = saved_or_built_tree(
        args.model, titles, tokenizer, tree_path=args.tree, rebuild=args.rebuild_tree, record=record
    )
    check_max_new_tokens(args.max_new_tokens, tree)
    return tree, source


def check_max_new_tokens(max_new_tokens: int | None, tree) -> None:
    """--max-new-tokens must let every item path end (terminator included); None means the longest path."""
    if max_new_tokens is None:
        return
    lengths = tree.item_length
    longest = int(lengths.max())
    if max_new_tokens < longest:
        cut = int((lengths > max_new_tokens).sum())
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} is shorter than the longest item path ({longest} tokens with the "
            f"terminator): {cut} of {tree.num_items} items ({100 * cut / tree.num_items:.0f}%) could never be "
            f"produced, and lists that reach for them would count as invalid. Drop --max-new-tokens (default: the "
            f"longest path) or set it to at least {longest}."
        )


def _check_sample(prompts: list[str]) -> list[str]:
    """The prompts checked against every title by the tokenisation check: the first and the last row. All prompts
    of one template end alike (where the title starts), so two suffice and keep the check at a few seconds."""
    return list(dict.fromkeys([prompts[0], prompts[-1]]))


def _run_recommend(args: EvaluateArguments, stages: _Stages) -> dict[str, Any]:
    import numpy as np

    from trl_flower.checkpoint import read_record
    from trl_flower.data import (
        PromptBuilder,
        check_prompt_tokenization,
        load_amazon,
        popularity_from_histories,
        select_rows,
    )
    from trl_flower.evaluation.metrics import TOPKS, group_fairness_at_k, recommendation_metrics
    from trl_flower.evaluation.recommend import export_official_json, recommend
    from trl_flower.evaluation.report import markdown_table, write_report
    from trl_flower.evaluation.sharding import decode_across_processes, is_main_process

    splits = ("train",) if args.split == "train" else ("train", args.split)
    data = stages.run("load data", load_amazon, args.data, data_root=args.data_root, splits=splits)
    rows = data.splits[args.split]
    rows = select_rows(rows, args.max_rows, args.row_sample_seed)
    if rows.num_rows == 0:
        raise ValueError(f"the {args.split} split of {data.path} has no rows")
    model, tokenizer, device = stages.run("load model", _load_model, args)
    info = read_record(args.model)
    tree, tree_source = stages.run("prefix tree", catalogue_tree, args, data.items, tokenizer, info)

    builder = (
        PromptBuilder(category=args.category, mode=args.prompt_mode, tokenizer=tokenizer)
        if args.category
        else PromptBuilder.from_dataset(data.name, mode=args.prompt_mode, tokenizer=tokenizer)
    )
    prompts = [builder(h) for h in rows["history_item_title"]]
    terminator = None if info.get("tokenization_mode") == "reference" else tree.terminator_id
    stages.run(
        "tokenisation check", check_prompt_tokenization, tokenizer, _check_sample(prompts), data.items, terminator
    )

    K = args.top_k
    common = dict(
        top_k=K,
        num_beams=args.num_beams,
        batch_size=args.batch_size or 16,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        titles=data.items,
        add_special_tokens=args.prompt_mode == "reference",
        show_progress=not args.no_progress,
        decoder=args.decoder,
    )
    if args.decoding == "d3":
        from trl_flower.baselines.d3 import recommend_d3

        logits = _split_logits(args.sasrec_logits, rows["row_index"], data.num_items)

        def decode(idx):
            subset = [prompts[i] for i in idx]
            return recommend_d3(model, tokenizer, subset, tree, logits[idx], args.guidance_scale, **common)
    else:

        def decode(idx):
            subset = [prompts[i] for i in idx]
            return recommend(model, tokenizer, subset, tree, length_penalty=args.length_penalty, **common)

    # under `accelerate launch --num_processes N` each process decodes every N-th batch; all get every list
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=common["add_special_tokens"])["input_ids"]]
    stage = "D3 beam search" if args.decoding == "d3" else "beam search"
    recs = stages.run(stage, decode_across_processes, decode, lengths, common["batch_size"], tree)

    def score():
        popularity = popularity_from_histories(data.splits["train"]["history_item_title"])
        ks = sorted({k for k in TOPKS if k <= K} | {K})
        fairness_ks = sorted({k for k in (10,) if k <= K} | {K})
        metrics = recommendation_metrics(
            recs.titles, rows["item_title"], popularity, data.items, ks=ks, fairness_ks=fairness_ks
        )
        metrics["unfinished"] = int((recs.item_ids < 0).sum())
        shares = group_fairness_at_k(recs.titles, popularity, data.items, ks=(K,))[f"group_shares@{K}"]
        return metrics, shares, popularity

    metrics, shares, popularity = stages.run("metrics", score)
    label = args.label or Path(args.model).expanduser().resolve().name
    settings = {
        **asdict(args),
        "length_penalty": 0.0 if args.decoding == "d3" else args.length_penalty,
        "num_beams": args.num_beams or K,
        "batch_size": args.batch_size or 16,
        "max_new_tokens": args.max_new_tokens or int(tree.item_length.max()),
        "device": device,
        "tree": tree_source,
        "tokenization_mode": info.get("tokenization_mode", "default"),
        "dataset": str(data.path),
        "num_rows": rows.num_rows,
        "num_items": data.num_items,
        "tree_nodes": tree.num_nodes,
    }
    if not is_main_process():  # the other processes of a multi-process launch decoded their share; rank 0 writes
        return {"metrics": metrics, "group_shares": shares, "table": "", "files": {}, "recommendations": recs}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Path] = {}
    if args.export_official_json:
        extra["predictions"] = out / OFFICIAL_JSON
        export_official_json(recs, rows["item_title"], extra["predictions"], prompts=prompts)
    metadata = _metadata(args, settings, stages)
    files = write_report(
        {label: metrics},
        out,
        title=f"{label} on {data.name} ({args.split}, {rows.num_rows} rows, top-{K})",
        group_shares={label: shares},
        reference_shares=np.asarray(popularity.shares).tolist(),
        reference_label=f"{data.name} train histories",
        metadata=metadata,
    )
    return {
        "metrics": metrics,
        "group_shares": shares,
        "table": markdown_table({label: metrics}),
        "files": {**files, **extra},
        "recommendations": recs,
        "metadata": metadata,
    }


def _split_logits(path: str, row_index, num_items: int):
    """The SASRec logits rows [U, num_items] of the evaluated rows (``row_index`` = CSV rows of the split)."""
    import numpy as np

    logits = np.load(Path(path).expanduser(), mmap_mode="r")
    rows = np.asarray(row_index, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[1] != num_items or logits.shape[0] <= int(rows.max()):
        raise ValueError(
            f"--sasrec-logits {path}: shape {logits.shape}, expected [rows of the split (> "
            f"{int(rows.max())}), {num_items} items]; pass the logits of the evaluated split"
        )
    return np.asarray(logits[rows], dtype=np.float64)


def history_free(args: EvaluateArguments, tokenizer) -> str:
    """The history-free prompt (reference text, or its instruction as a chat user message)."""
    from trl_flower.data import history_free_prompt

    text = history_free_prompt(args.item_noun, response_space=args.response_space)
    if args.prompt_mode == "reference":
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--prompt-mode chat needs a tokenizer with a chat template; use --prompt-mode reference")
    message = text.rsplit("### Response:", 1)[0].rstrip("\n")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def _run_distribution(args: EvaluateArguments, stages: _Stages) -> dict[str, Any]:
    from collections import Counter

    from trl_flower.checkpoint import read_record
    from trl_flower.data import check_prompt_tokenization
    from trl_flower.evaluation.distribution import distribution_metrics
    from trl_flower.evaluation.recommend import sample_items
    from trl_flower.evaluation.report import markdown_table, write_report

    target_path, target = stages.run("load target", load_target, args.target, args.data_root)
    titles = list(target)
    model, tokenizer, device = stages.run("load model", _load_model, args)
    info = read_record(args.model)
    tree, tree_source = stages.run("prefix tree", catalogue_tree, args, titles, tokenizer, info)
    prompt = history_free(args, tokenizer)
    terminator = None if info.get("tokenization_mode") == "reference" else tree.terminator_id
    stages.run("tokenisation check", check_prompt_tokenization, tokenizer, [prompt], titles, terminator)
    items = stages.run(
        "sampling",
        sample_items,
        model,
        tokenizer,
        [prompt],
        tree,
        num_samples=args.num_samples,
        temperature=args.temperature,
        batch_size=args.batch_size or 64,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        add_special_tokens=args.prompt_mode == "reference",
        show_progress=not args.no_progress,
    )[0]  # [S]
    generated = [titles[i] if i >= 0 else "" for i in items.tolist()]  # "" = a title cut by max_new_tokens
    metrics = stages.run("metrics", distribution_metrics, generated, target, tokenizer)
    metrics["unfinished"] = int((items < 0).sum())

    label = args.label or Path(args.model).expanduser().resolve().name
    settings = {
        **asdict(args),
        "batch_size": args.batch_size or 64,
        "max_new_tokens": args.max_new_tokens or int(tree.item_length.max()),
        "device": device,
        "tree": tree_source,
        "tokenization_mode": info.get("tokenization_mode", "default"),
        "target_file": str(target_path),
        "num_items": len(titles),
        "prompt": prompt,
    }
    metadata = _metadata(args, settings, stages)
    files = write_report(
        {label: metrics},
        args.output_dir,
        title=f"{label}: distribution fitting on {target_path.name} ({args.num_samples} samples)",
        generated_counts={label: dict(Counter(generated))},
        target_counts=target,
        metadata=metadata,
    )
    return {
        "metrics": metrics,
        "table": markdown_table({label: metrics}),
        "files": files,
        "generated": generated,
        "metadata": metadata,
    }


def _metadata(args: EvaluateArguments, settings: dict[str, Any], stages: _Stages) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import trl_flower

    versions = {"python": platform.python_version(), "trl_flower": trl_flower.__version__}
    for package in ("torch", "transformers", "trl", "datasets", "numpy", "matplotlib"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "command": command_line(args),
        "seed": args.seed,
        "wall_time_s": stages.total(),
        "settings": settings,
        "versions": versions,
    }
