"""Baselines the Flower paper compares with (flower_reference.md §4): SASRec, BIGRec/IFairLRS, D3, the DPO family, RL.

Names are exported lazily (PEP 562), so importing one baseline does not import the others' dependencies.
"""

from trl_flower._lazy import lazy_exports

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
    "build_sft_dataset": "trl_flower.baselines.sft",
    "ifair_group_weights": "trl_flower.baselines.sft",
    "ifair_sample_weights": "trl_flower.baselines.sft",
    "IFairSFTTrainer": "trl_flower.baselines.sft",
    "train_sft": "trl_flower.baselines.sft",
    "D3GuidanceProcessor": "trl_flower.baselines.d3",
    "guided_edge_scores": "trl_flower.baselines.d3",
    "recommend_d3": "trl_flower.baselines.d3",
    "sdpo_loss": "trl_flower.baselines.preference",
    "dmpo_loss": "trl_flower.baselines.preference",
    "dpo_sigmoid_loss": "trl_flower.baselines.preference",
    "sample_uniform_negatives": "trl_flower.baselines.preference",
    "sample_popularity_negatives": "trl_flower.baselines.preference",
    "make_preference_dataset": "trl_flower.baselines.preference",
    "MultiNegativeDPOTrainer": "trl_flower.baselines.preference",
    "train_preference": "trl_flower.baselines.preference",
    "sasrec_reward": "trl_flower.baselines.online_rl",
    "train_online_rl": "trl_flower.baselines.online_rl",
    "TrieConstrainedGRPOTrainer": "trl_flower.baselines.online_rl",
    "TrieConstrainedRLOOTrainer": "trl_flower.baselines.online_rl",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
