"""Model cards of saved runs: TRL's card (method, paper, citation, versions) plus a trl-flower section.

TRL trainers write ``README.md`` with `create_model_card` (at every checkpoint and on ``push_to_hub``). trl-flower
keeps that card and appends what a reader of a recommender checkpoint needs: the Flower settings (`FlowerTrainer`
does it in its own `create_model_card`), the data it was trained on, the evaluation metrics when the run was
evaluated, and how to load the tree. The section builders are pure functions of plain dicts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trl_flower import checkpoint

__all__ = [
    "FLOWER_SETTINGS",
    "append_flower_section",
    "append_section",
    "data_section",
    "evaluation_section",
    "flower_section",
    "write_model_card",
]

FLOWER_SETTINGS = (
    "flow_lambda",
    "flow_loss",
    "subtb_lambda",
    "title_log_term",
    "flow_policy_support",
    "reward_variant",
    "nonterminal_log_term",
    "offline_trajectory_prob",
    "offline_trajectory_prob_final",
    "tokenization_mode",
    "num_generations",
    "temperature",
)
"""The record fields shown first in a card's Flower settings table (the rest of the record follows)."""

_FLOWER_HEADING = "## Flower settings"


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def flower_section(record: Mapping[str, Any]) -> str:
    """Markdown: the Flower settings of a run (its `trl_flower.checkpoint` record) and how to read its tree.

    Example:
        >>> print(flower_section({"flow_lambda": 0.005, "flow_loss": "flower_subtb"}).splitlines()[6])
        | `flow_lambda` | 0.005 |
    """
    shown = {k: record[k] for k in FLOWER_SETTINGS if k in record}
    rest = {k: v for k, v in record.items() if k not in shown and k != "format"}
    return "\n\n".join(
        [
            _FLOWER_HEADING,
            "Trained with trl-flower's `FlowerTrainer` (a TRL `GRPOTrainer`): "
            "loss = (1 − λ)·SFT + λ·flow loss on trie-constrained samples, with token-level process rewards from "
            "the catalogue's prefix tree ([Flower](https://huggingface.co/papers/2503.07377)).",
            _table({**shown, **rest}, ("setting", "value")),
            f"The directory also holds the prefix tree (`{checkpoint.TREE_FILE}`) and this record "
            f"(`{checkpoint.RECORD_FILE}`): `trl_flower.checkpoint.load_tree(path)` and `read_record(path)` read "
            "them; `trl-flower evaluate --model <path>` decodes with the tree.",
        ]
    )


def data_section(data: Mapping[str, Any]) -> str:
    """Markdown: what the run was trained on (dataset, items, rows, prompt mode, ...)."""
    return "## Training data\n\n" + _table(data, ("", "value"))


def evaluation_section(metrics: Mapping[str, Any], title: str = "Evaluation") -> str:
    """Markdown: evaluation metrics of the saved model (e.g. ``trl-flower evaluate`` or the example's)."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    return f"## {title}\n\n" + _table(scalars, ("metric", "value"))


def append_section(card: str | os.PathLike, section: str) -> Path:
    """Append a markdown section to the model card file `card` (created if missing)."""
    path = Path(card)
    text = path.read_text() if path.is_file() else ""
    path.write_text(text.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")
    return path


def append_flower_section(card: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append the Flower settings to a freshly written TRL card (once: a card that has them is left as is)."""
    path = Path(card)
    if path.is_file() and _FLOWER_HEADING in path.read_text():
        return path
    return append_section(path, flower_section(record))


def write_model_card(
    trainer: Any,
    output_dir: str | os.PathLike,
    *,
    dataset_name: str | None = None,
    data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    tags: list[str] | None = None,
) -> Path | None:
    """Write the model card of a saved run into `output_dir` (main process only); returns its path.

    TRL's `create_model_card` writes the card (into ``trainer.args.output_dir``, as TRL does; `FlowerTrainer` adds its
    Flower settings), then the data and metrics sections are appended and the card is moved to `output_dir` if that
    is another directory.

    Args:
        trainer: any TRL trainer (FlowerTrainer, SFTTrainer, DPOTrainer, GRPO/RLOO, ...).
        output_dir: the saved model directory.
        dataset_name: shown by TRL's card (and its Hub metadata).
        data: rows of the training-data table (:func:`data_section`).
        metrics: evaluation metrics of the saved model (:func:`evaluation_section`).
        tags: extra Hub tags (``trl-flower`` is always added).
    """
    if not trainer.is_world_process_zero():
        return None
    model_name = Path(output_dir).resolve().name
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name, tags=["trl-flower", *(tags or [])])
    written = checkpoint.model_card_path(trainer.args.output_dir)
    card = checkpoint.model_card_path(output_dir)
    if written.resolve() != card.resolve():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        written.replace(card)
    if data:
        append_section(card, data_section(data))
    if metrics:
        append_section(card, evaluation_section(metrics))
    return card
