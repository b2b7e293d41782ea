"""The on-disk format of a saved trl-flower run: the one module that names the files a run holds beside its weights.

A saved run is a plain Hugging Face model directory (weights, ``config.json``, generation config, tokenizer, chat
template; written by transformers / TRL, loadable with ``AutoModelForCausalLM.from_pretrained``, usable as a TRL
reference policy) plus the files below. Every module and script writes and reads them through this module:

==========================  ============================================  ==========================================
file                        content                                       written by / read by
==========================  ============================================  ==========================================
``prefix_tree.npz``         the catalogue's `PrefixTree` (structure and   :func:`save_run_files` / :func:`find_tree`,
                            item rewards)                                 :func:`load_tree`, :func:`catalogue_tree`
``flower_config.json``      the Flower record: format tag, tree file,     :func:`save_run_files` / :func:`read_record`
                            terminator, tokenisation mode, reward and
                            loss settings (every Flower field of the
                            config)
``item_groups.npy``         popularity group per item id (when given)     :func:`save_run_files` /
                                                                          :func:`load_item_groups`
``offline_rng_state.pth``   checkpoints only: the generator of the        :func:`save_offline_rng` /
                            offline/on-policy draws                       :func:`load_offline_rng`
``README.md``               the model card (TRL's, plus a trl-flower      `trl_flower.model_card` through
                            section)                                      :func:`model_card_path`
==========================  ============================================  ==========================================

``from_pretrained`` ignores all of them. Runs saved by older versions may hold the tree as ``flower_tree.npz``;
:func:`find_tree` still reads it.

Before a run resumes, :func:`check_resume_checkpoint` reads the files transformers' Trainer wrote into the
``checkpoint-<step>`` directory (trainer state, weights, optimizer, scheduler, RNG state) cheaply, so that a damaged
file is reported with its name before anything loads, and a missing RNG state warns.

Nothing here imports TRL: the functions take the pieces (tree, record, arrays) and plain paths.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trl_flower.tree import PrefixTree

__all__ = [
    "ITEM_GROUPS_FILE",
    "MODEL_CARD_FILE",
    "OFFLINE_RNG_FILE",
    "RECORD_FILE",
    "RECORD_FORMAT",
    "TREE_FILE",
    "catalogue_tree",
    "check_resume_checkpoint",
    "check_tree_matches",
    "find_tree",
    "flower_record",
    "has_tree",
    "is_model_dir",
    "load_item_groups",
    "load_model",
    "load_offline_rng",
    "load_tree",
    "model_card_path",
    "read_record",
    "resolve_tree",
    "resume_checkpoint_dir",
    "save_offline_rng",
    "save_run_files",
]

TREE_FILE = "prefix_tree.npz"
RECORD_FILE = "flower_config.json"
ITEM_GROUPS_FILE = "item_groups.npy"
OFFLINE_RNG_FILE = "offline_rng_state.pth"
MODEL_CARD_FILE = "README.md"  # the name TRL's `create_model_card` and the Hub use
LEGACY_TREE_FILES = ("flower_tree.npz",)  # read only: runs saved before the tree was called prefix_tree.npz
RECORD_FORMAT = "trl-flower/1"

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------- writing


def flower_record(
    args: Any,
    tree: PrefixTree,
    reward_model: Any,
    finished_token_id: int | None,
    has_item_groups: bool,
) -> dict[str, Any]:
    """The Flower record of a run: what an evaluation or a chained trainer needs besides the weights and the tree.

    Args:
        args: the run's `FlowerConfig`. Every field `FlowerConfig` declares beyond `GRPOConfig` is recorded (so a
            new Flower field is recorded without touching this function), plus the GRPO-level fields Flower reads.
        tree: the tree the run trained with (its terminator and size are recorded).
        reward_model: the run's `PrefixTreeRewardModel`; its reward settings win over the config's (a trainer given a
            reward model keeps the config's reward fields at their defaults).
        finished_token_id: the token forced after the terminator in ``tokenization_mode="reference"`` (else None).
        has_item_groups: whether ``item_groups.npy`` is written beside it.

    Returns:
        A JSON-serialisable dict with the keys ``format``, ``tree_file``, ``item_groups_file``, ``terminator_id``,
        ``num_items``, ``finished_token_id``, the Flower fields, and the reward model's ``reward_variant``,
        ``row_index_column``, ``nonterminal_log_term``, ``title_log_term`` and ``distill`` (its resolved distilled
        reward settings, or None).
    """
    from trl import GRPOConfig  # the record is written by the trainer, which has TRL loaded already

    grpo_fields = {f.name for f in fields(GRPOConfig)}
    flower_fields = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in grpo_fields}
    return {
        "format": RECORD_FORMAT,
        "tree_file": TREE_FILE,
        "item_groups_file": ITEM_GROUPS_FILE if has_item_groups else None,
        "terminator_id": int(tree.terminator_id),
        "num_items": int(tree.num_items),
        "finished_token_id": finished_token_id,
        **flower_fields,
        "reward_variant": reward_model.variant,
        "row_index_column": reward_model.row_column,
        "nonterminal_log_term": reward_model.nonterminal_log_term,
        "title_log_term": reward_model.title_log_term,
        "distill": asdict(reward_model.distill) if getattr(reward_model, "distill", None) else None,
        "num_generations": args.num_generations,
        "temperature": args.temperature,
    }


def save_run_files(
    output_dir: PathLike,
    *,
    tree: PrefixTree,
    record: Mapping[str, Any] | None = None,
    item_groups: np.ndarray | torch.Tensor | Sequence[int] | None = None,
) -> Path:
    """Write what a saved run holds beside its weights: the tree, the Flower record (if any), the item groups (if any).

    Called on the main process only (``args.should_save``): `FlowerTrainer._save` for every Flower checkpoint, and
    the baselines' save for SFT / DPO / online RL runs (tree only), so that ``trl-flower evaluate`` finds the tree
    of any run.

    Args:
        output_dir: the model directory (created if missing).
        tree: the catalogue's prefix tree (with the item rewards the run used).
        record: the Flower record (:func:`flower_record`); None for the baselines, which have none.
        item_groups: popularity group per item id, [num_items].

    Returns:
        The directory.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tree.save(out / TREE_FILE)
    if item_groups is not None:
        groups = item_groups.cpu().numpy() if isinstance(item_groups, torch.Tensor) else np.asarray(item_groups)
        np.save(out / ITEM_GROUPS_FILE, groups)
    if record is not None:
        (out / RECORD_FILE).write_text(json.dumps(dict(record), indent=2, default=str) + "\n")
    return out


def save_offline_rng(checkpoint_dir: PathLike, generator: torch.Generator) -> None:
    """Save the offline/on-policy draw generator's state into a Trainer checkpoint directory."""
    torch.save(generator.get_state(), Path(checkpoint_dir) / OFFLINE_RNG_FILE)


# ---------------------------------------------------------------------------------------------------- reading


def read_record(model_dir: PathLike) -> dict[str, Any]:
    """The Flower record of a saved run, or ``{}`` when the directory has none (a baseline or a foreign model)."""
    path = Path(model_dir).expanduser() / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it is the Flower record a FlowerTrainer writes on save. Delete it to "
            "treat the directory as a plain model, or save the run again."
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object (the Flower record); got {type(record).__name__}")
    return record


def find_tree(model_dir: PathLike, record: Mapping[str, Any] | None = None) -> Path | None:
    """The tree file of a saved run: the one its record names, else ``prefix_tree.npz``, else a legacy name; or None.

    Args:
        model_dir: the model directory.
        record: its Flower record, if already read (:func:`read_record`).
    """
    model_dir = Path(model_dir).expanduser()
    record = read_record(model_dir) if record is None else record
    named = [record["tree_file"]] if record.get("tree_file") else []
    for name in dict.fromkeys([*named, TREE_FILE, *LEGACY_TREE_FILES]):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def is_model_dir(path: PathLike) -> bool:
    """Whether `path` is a Hugging Face model directory: full weights (``config.json``) or a PEFT adapter
    (``adapter_config.json``, whose base model transformers loads first)."""
    path = Path(path).expanduser()
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def has_tree(model_dir: PathLike) -> bool:
    """Whether `model_dir` is a model directory with a saved tree (a finished trl-flower run)."""
    return is_model_dir(model_dir) and find_tree(model_dir) is not None


def load_tree(model_dir: PathLike) -> PrefixTree | None:
    """The prefix tree saved in `model_dir` (with the item rewards the run used), or None when it has none."""
    path = find_tree(model_dir)
    return None if path is None else PrefixTree.load(path)


def resolve_tree(
    tree: PrefixTree | PathLike | None = None,
    *,
    titles: Sequence[str] | None = None,
    tokenizer=None,
    model_dirs: Sequence[PathLike | None] = (),
) -> PrefixTree:
    """The tree a baseline trains with: `tree` itself (a `PrefixTree` or an ``.npz`` path), else one built from
    `titles` with `tokenizer`, else the tree saved in the first of `model_dirs` that has one."""
    if isinstance(tree, PrefixTree):
        return tree
    if tree is not None:
        return PrefixTree.load(tree)
    if titles is not None:
        return PrefixTree.from_titles(list(titles), tokenizer)
    for model_dir in model_dirs:
        found = None if model_dir is None else load_tree(model_dir)
        if found is not None:
            return found
    raise ValueError(
        f"no prefix tree: pass tree= (a PrefixTree or an .npz path) or titles=, or start from a saved run that has "
        f"{TREE_FILE} (a directory saved by trl-flower)"
    )


def load_item_groups(model_dir: PathLike) -> np.ndarray | None:
    """The popularity group per item id saved with a Flower run ([num_items] int64), or None."""
    path = Path(model_dir).expanduser() / ITEM_GROUPS_FILE
    return np.load(path) if path.is_file() else None


def load_offline_rng(checkpoint_dir: PathLike) -> torch.Generator | None:
    """The offline/on-policy draw generator saved in a Trainer checkpoint, or None when the run never drew."""
    path = Path(checkpoint_dir) / OFFLINE_RNG_FILE
    if not path.is_file():
        return None
    generator = torch.Generator()
    generator.set_state(torch.load(path, weights_only=True))
    return generator


# ---------------------------------------------------------------------------------------------------- resuming

TRAINER_STATE_FILE = "trainer_state.json"  # the files a transformers Trainer checkpoint holds (transformers' names)
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def resume_checkpoint_dir(resume_from_checkpoint: PathLike | bool | None, output_dir: PathLike) -> Path | None:
    """The checkpoint directory a ``resume_from_checkpoint`` value means (True: the last one in `output_dir`).

    Raises:
        FileNotFoundError: True but `output_dir` holds no ``checkpoint-*`` directory, or a path that does not exist.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(os.fspath(output_dir)) if Path(output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-<step> directory to resume from; "
                "drop resume_from_checkpoint to start afresh, or name a checkpoint directory"
            )
        return Path(last)
    path = Path(resume_from_checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={os.fspath(resume_from_checkpoint)}: no such directory")
    return path


def check_resume_checkpoint(checkpoint_dir: PathLike, *, world_size: int = 1, process_index: int = 0) -> None:
    """Check a Trainer checkpoint before a run resumes from it: every error names the file and what to do.

    Reads what is cheap to read without loading the run: the JSON trainer state, the header (and size) of every
    safetensors weight file, and PyTorch state files memory-mapped (optimizer, scheduler, scaler, RNG). A missing
    RNG state is not an error (transformers resumes without it) but the resumed run then draws other random numbers
    than the uninterrupted one would have, so it gets a loud warning.

    Args:
        checkpoint_dir: a ``checkpoint-<step>`` directory written by a transformers Trainer.
        world_size: processes of the resuming run (the RNG file is per process when > 1).
        process_index: this process's rank.

    Raises:
        ValueError: a file is damaged (cut off by an interruption, overwritten) or not what its name says.
        FileNotFoundError: the directory has no ``trainer_state.json`` (not a complete Trainer checkpoint).
    """
    ckpt = Path(checkpoint_dir).expanduser()
    state = ckpt / TRAINER_STATE_FILE
    if not state.is_file():
        raise FileNotFoundError(
            f"{state} not found: {ckpt} is not a complete Trainer checkpoint (its save was probably interrupted). "
            f"{_earlier_checkpoints_hint(ckpt)}"
        )
    try:
        content = json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{state} is not valid JSON ({err}): {_damaged(ckpt)}") from None
    if not isinstance(content, dict) or not isinstance(content.get("global_step"), int):
        raise ValueError(f"{state} is not a Trainer state (no integer 'global_step'): {_damaged(ckpt)}")
    for name in SHARD_INDEX_FILES:
        index = ckpt / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as err:
                problem = f"{type(err).__name__}: {err}"
                raise ValueError(f"{index} is not a shard index ({problem}): {_damaged(ckpt)}") from None
            for shard in shards:
                _check_weights(ckpt / shard, ckpt)
    for name in WEIGHT_FILES:
        if (ckpt / name).is_file():
            _check_weights(ckpt / name, ckpt)
    for name in TORCH_STATE_FILES:
        if (ckpt / name).is_file():
            _check_torch_file(ckpt / name, ckpt)
    rng_name = f"rng_state_{process_index}.pth" if world_size > 1 else "rng_state.pth"
    rng = ckpt / rng_name
    if rng.is_file():
        _check_torch_file(rng, ckpt)
    else:
        warnings.warn(
            f"{rng} is missing: the run resumes from {ckpt.name} with fresh random number generators, so its "
            "sampling, dropout and data order differ from the uninterrupted run and the result is not "
            "reproducible. Resume from a checkpoint that has its RNG state, or accept the difference.",
            stacklevel=2,
        )


def _check_weights(path: Path, ckpt: Path) -> None:
    """A weight file is readable: a safetensors header that fits the file's size, or a PyTorch state file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in the shard index but missing: {_damaged(ckpt)}")
    if path.suffix != ".safetensors":
        _check_torch_file(path, ckpt)
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except Exception as err:  # safetensors raises its own error types for a bad header or a truncated file
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}): {_damaged(ckpt)}"
        ) from None


def _check_torch_file(path: Path, ckpt: Path) -> None:
    """A PyTorch state file (``torch.save``) loads with ``weights_only=True``, memory-mapped (nothing is copied)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch state file (not a torch.save zip archive): {_damaged(ckpt, torch_file=True)}"
        )
    from transformers.trainer_pt_utils import safe_globals  # numpy RNG states, as transformers loads them

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} cannot be read ({first_line}): {_damaged(ckpt, torch_file=True)}") from None


def _damaged(ckpt: Path, torch_file: bool = False) -> str:
    unsafe = "Do not load it with weights_only=False: it is not a state file this run wrote. " if torch_file else ""
    return (
        f"the checkpoint is damaged (a save cut off by an interruption, or a file overwritten). {unsafe}"
        f"{_earlier_checkpoints_hint(ckpt)}"
    )


def _earlier_checkpoints_hint(ckpt: Path) -> str:
    """Which other checkpoints of the run could be resumed instead."""
    others = sorted(
        (p.name for p in ckpt.parent.glob("checkpoint-*") if p.is_dir() and p != ckpt),
        key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    if others:
        return f"Resume from another checkpoint of the run ({', '.join(others)}) or delete {ckpt} and resume again."
    return "Delete it and start the run afresh (it has no other checkpoint)."


def model_card_path(model_dir: PathLike) -> Path:
    """Where the model card of a saved run lives (``README.md``, as TRL and the Hub name it)."""
    return Path(model_dir) / MODEL_CARD_FILE


def load_model(model_dir: PathLike, device: str | torch.device = "cpu"):
    """The causal LM and tokenizer of a saved run, in evaluation mode on `device` (weights in their saved dtype).

    A LoRA run's directory holds the adapter; transformers loads its base model and applies it (needs peft).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- catalogue


def check_tree_matches(tree: PrefixTree, titles: Sequence[str], tokenizer, where: str) -> None:
    """Raise ValueError unless `tree` has one path per title, over this tokenizer, decoding to the titles (in order).

    Args:
        tree: a saved tree.
        titles: the catalogue's titles, item id = index.
        tokenizer: the model's tokenizer.
        where: where the tree came from (named in the error).
    """
    fix = (
        "rebuild it from the titles (`trl-flower evaluate --rebuild-tree`, catalogue_tree(..., rebuild=True)) or "
        "pass the matching tree (`--tree`)"
    )
    if tree.num_items != len(titles):
        raise ValueError(
            f"the prefix tree {where} has {tree.num_items} items but the catalogue has {len(titles)}; "
            f"it was built for another catalogue: {fix}"
        )
    if tree.vocab_bound > len(tokenizer):
        raise ValueError(
            f"the prefix tree {where} uses token ids up to {tree.vocab_bound - 1} but the tokenizer has "
            f"{len(tokenizer)}: it was built with another tokenizer; {fix}"
        )
    paths, lengths = tree.item_paths(torch.arange(tree.num_items))  # [N, L], [N]
    rows = [p[: n - 1] for p, n in zip(paths.tolist(), lengths.tolist())]  # title tokens, terminator dropped
    decoded = tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    bad = [i for i, (d, t) in enumerate(zip(decoded, titles)) if d.strip() != t.strip()]
    if bad:
        shown = "; ".join(f"item {i}: tree {decoded[i]!r} vs catalogue {titles[i]!r}" for i in bad[:3])
        raise ValueError(
            f"the prefix tree {where} does not match the catalogue for {len(bad)} of {len(titles)} "
            f"items ({shown}); {fix}"
        )


def catalogue_tree(
    model_dir: PathLike,
    titles: Sequence[str],
    tokenizer,
    *,
    tree_path: PathLike | None = None,
    rebuild: bool = False,
    record: Mapping[str, Any] | None = None,
) -> tuple[PrefixTree, str]:
    """The prefix tree to decode a saved run with, and where it came from.

    Order: `tree_path` if given; else (unless `rebuild`) the tree saved in `model_dir` (:func:`find_tree`), which
    must exist; with `rebuild`, one built from `titles` with the tokenizer (terminator: its EOS). A saved or given
    tree must match the catalogue (:func:`check_tree_matches`). A run without a saved tree is an error, not a silent
    rebuild: a tree built now may differ from the one the model was trained on (another terminator or
    tokenisation), so rebuilding is the caller's explicit choice.

    Args:
        model_dir: the model directory.
        titles: the catalogue's titles, item id = index.
        tokenizer: the model's tokenizer.
        tree_path: an explicit ``.npz`` tree.
        rebuild: ignore a saved tree.
        record: the Flower record, if already read.

    Returns:
        ``(tree, source)``: source is the tree file's path or ``"built from the catalogue titles"``.

    Raises:
        FileNotFoundError: `tree_path` does not exist, or `model_dir` has no saved tree and `rebuild` is False.
        ValueError: the tree file is not a tree, or it does not match the catalogue.
    """
    if tree_path is not None and rebuild:
        raise ValueError("a tree path and rebuild=True contradict each other (--tree and --rebuild-tree); give one")
    path: Path | None = None
    if tree_path is not None:
        path = Path(tree_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--tree {tree_path}: no such file")
    elif not rebuild:
        path = find_tree(model_dir, record)
        if path is None:
            raise FileNotFoundError(
                f"{Path(model_dir).expanduser() / TREE_FILE} not found: {model_dir} holds no saved prefix tree (every "
                "run trl-flower saves has one; a model from elsewhere has none). To decode with a tree built from the "
                "catalogue titles and the tokenizer's EOS terminator, ask for it: `trl-flower evaluate "
                "--rebuild-tree` (catalogue_tree(..., rebuild=True)); or pass a tree file with --tree."
            )
    if path is None:
        return PrefixTree.from_titles(list(titles), tokenizer), "built from the catalogue titles"
    tree = PrefixTree.load(path)
    check_tree_matches(tree, titles, tokenizer, str(path))
    return tree, str(path)
