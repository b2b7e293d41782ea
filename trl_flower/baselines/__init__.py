"""Baselines the Flower paper compares with (flower_reference.md §4), starting with SASRec.

Names are exported lazily (PEP 562), so importing one baseline does not import the others' dependencies.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "SASRec": "trl_flower.baselines.sasrec",
    "SASRecConfig": "trl_flower.baselines.sasrec",
    "SASRecTrainingArguments": "trl_flower.baselines.sasrec",
    "SASRecTrainResult": "trl_flower.baselines.sasrec",
    "SequenceSplit": "trl_flower.baselines.sasrec",
    "encode_histories": "trl_flower.baselines.sasrec",
    "train_sasrec": "trl_flower.baselines.sasrec",
    "fit_sasrec": "trl_flower.baselines.sasrec",
    "evaluate_sasrec": "trl_flower.baselines.sasrec",
    "save_row_logits": "trl_flower.baselines.sasrec",
    "export_split_logits": "trl_flower.baselines.sasrec",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Import public names on first access."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_flower.baselines' has no attribute {name!r}")
