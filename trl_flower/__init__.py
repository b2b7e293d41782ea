"""trl-flower: flow-guided (GFlowNet) fine-tuning of generative LLM recommenders on top of Hugging Face TRL.

The light-weight building blocks (prefix tree, rewards, losses, decoding) import only torch and numpy.
The TRL-facing classes (`FlowerConfig`, `FlowerTrainer`) are imported lazily so that `import trl_flower`
stays fast and does not pull in TRL.
"""

from trl_flower._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "PrefixTree": "trl_flower.tree",
    "PrefixTreeRewardModel": "trl_flower.rewards",
    "TrieLogitsProcessor": "trl_flower.decoding",
    "FlowerConfig": "trl_flower.config",
    "FlowerTrainer": "trl_flower.trainer",
}

__getattr__, _names = lazy_exports(__name__, _LAZY)
__all__ = ["__version__", *_names]
