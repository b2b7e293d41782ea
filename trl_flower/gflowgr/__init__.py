"""GFlowGR: GFlowNet fine-tuning of semantic-ID generative recommenders (arXiv 2506.16114).

* :mod:`~trl_flower.gflowgr.semantic_ids`: items -> residual-quantised code tokens and their prefix tree.
* :mod:`~trl_flower.gflowgr.sampler`: the trajectory sampler (logs, random, curriculum, beam).
* :mod:`~trl_flower.gflowgr.reward`: the reward model (interaction level + collaborative score + code overlap).
* :mod:`~trl_flower.gflowgr.trainer`: ``GFlowGRConfig`` / ``GFlowGRTrainer`` (SFT + λ·TB or DB with learned flows).

Heavy classes are imported lazily so ``import trl_flower.gflowgr`` stays light.
"""

from trl_flower._lazy import lazy_exports

_LAZY = {
    "SemanticIDs": "trl_flower.gflowgr.semantic_ids",
    "fit_semantic_ids": "trl_flower.gflowgr.semantic_ids",
    "embed_titles": "trl_flower.gflowgr.semantic_ids",
    "TrajectorySampler": "trl_flower.gflowgr.sampler",
    "GFlowGRReward": "trl_flower.gflowgr.reward",
    "GFlowGRConfig": "trl_flower.gflowgr.config",
    "GFlowGRTrainer": "trl_flower.gflowgr.trainer",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
