"""trl-flower: flow-guided (GFlowNet) fine-tuning of generative LLM recommenders on top of Hugging Face TRL.

The light-weight building blocks (prefix tree, rewards, losses, decoding) import only torch and numpy.
The TRL-facing classes (`FlowerConfig`, `FlowerTrainer`) are imported lazily so that `import trl_flower`
stays fast and does not pull in TRL.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PrefixTree": "trl_flower.tree",
    "PrefixTreeRewardModel": "trl_flower.rewards",
    "TrieLogitsProcessor": "trl_flower.decoding",
    "FlowerConfig": "trl_flower.config",
    "FlowerTrainer": "trl_flower.trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import public classes on first access (PEP 562) so that light users never import TRL."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_flower' has no attribute {name!r}")
