"""`GFlowGRConfig`: training arguments of GFlowGR (arXiv 2506.16114).

The only change w.r.t. [`transformers.TrainingArguments`] is the GFlowGR block below (sampler, reward, GFlowNet loss,
learned flow heads) and two defaults: ``remove_unused_columns=False`` (the trainer reads prompt/item/history columns
itself) and ``report_to="none"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from trl_flower.gflowgr.reward import FUSIONS, SCORE_SOURCES, SIMILARITIES
from trl_flower.gflowgr.sampler import STRATEGIES

GFN_LOSSES = ("tb", "db", "none")
LOG_Z_MODES = ("prompt", "scalar")


@dataclass
class GFlowGRConfig(TrainingArguments):
    r"""Configuration of [`GFlowGRTrainer`]: L = L_GR(positive) + λ Σ_{n ≤ N+1} L_GFN(τ_n).

    > Parameters that control the objective

    gfn_loss (`str`, defaults to `"tb"`): `"tb"` (trajectory balance, learned log Z), `"db"` (detailed balance,
        learned state-flow head) or `"none"` (plain SFT on the code paths).
    gfn_lambda (`float`, defaults to `1.0`): λ ≥ 0, the GFlowNet weight (paper grid {0.01 … 100}, best ≈ 1).
    log_z (`str`, defaults to `"prompt"`): `"prompt"`: log Z(U) from a linear head on the last prompt hidden state;
        `"scalar"`: one learned log Z.
    head_lr_multiplier (`float`, defaults to `10.0`): learning rate of the flow / log Z heads and of the learnable
        reward weights, as a multiple of `learning_rate` (GFlowNet practice: flows learn faster).
    detach_head_inputs (`bool`, defaults to `False`): feed the log Z / flow heads detached hidden states, so the
        GFlowNet loss reaches the LM only through log P_GR(τ) and not through the regression of log Z or log F
        (ours; the paper does not say).

    > Parameters that control the trajectory sampler

    num_augmented (`int`, defaults to `3`): N augmented items per positive (N + 1 trajectories per row).
    sampling_strategy (`str`, defaults to `"curriculum"`): `"logs"`, `"random"`, `"curriculum"` or `"beam"`.
    curriculum_window (`int` or `None`): W ranks of the curriculum window (default 2N).
    beam_width (`int` or `None`): beams for `"beam"` (default N + 1).

    > Parameters that control the reward

    reward_positive, reward_logged, reward_unobserved (`float`, defaults 10 / 1 / 0): r_a per interaction level.
    score_source (`str`, defaults to `"cm"`): `"cm"` (collaborative-model row scores), `"model"` (own probability)
        or `"none"`.
    reward_fusion (`str`, defaults to `"sum"`): `"sum"` or `"weighted"` (learnable weights).
    reward_epsilon (`float`, defaults to `1e-3`): ε in log(R + ε).
    reward_similarity (`str`, defaults to `"position"`): r_sim as position-wise code matches (paper) or `"prefix"`,
        the length of the shared code prefix (ours).

    > Parameters that control the data

    prompt_column, item_id_column, history_column, row_index_column (`str`): dataset columns (prompt text, positive
        item id, history item ids, row of `cm_scores`; the row index column is optional and defaults to the row's
        position in the dataset).
    max_prompt_length (`int`, defaults to `512`): prompts are truncated from the left to this many tokens.
    """

    gfn_loss: str = field(default="tb", metadata={"help": "tb | db | none"})
    gfn_lambda: float = field(default=1.0, metadata={"help": "λ, weight of the GFlowNet loss"})
    log_z: str = field(default="prompt", metadata={"help": "prompt | scalar"})
    head_lr_multiplier: float = field(default=10.0, metadata={"help": "lr multiplier of flow/logZ heads"})
    detach_head_inputs: bool = field(default=False, metadata={"help": "detach the hidden states fed to the heads"})
    num_augmented: int = field(default=3, metadata={"help": "N augmented trajectories per positive"})
    sampling_strategy: str = field(default="curriculum", metadata={"help": "logs | random | curriculum | beam"})
    curriculum_window: int | None = field(default=None, metadata={"help": "curriculum window W (default 2N)"})
    beam_width: int | None = field(default=None, metadata={"help": "beams for the beam strategy (default N+1)"})
    reward_positive: float = field(default=10.0, metadata={"help": "r_a of the positive"})
    reward_logged: float = field(default=1.0, metadata={"help": "r_a of a history/session item"})
    reward_unobserved: float = field(default=0.0, metadata={"help": "r_a of an unobserved item"})
    score_source: str = field(default="cm", metadata={"help": "cm | model | none"})
    reward_fusion: str = field(default="sum", metadata={"help": "sum | weighted"})
    reward_epsilon: float = field(default=1e-3, metadata={"help": "ε in log(R + ε)"})
    reward_similarity: str = field(default="position", metadata={"help": "r_sim: position | prefix"})
    prompt_column: str = field(default="prompt", metadata={"help": "prompt text column"})
    item_id_column: str = field(default="item_id", metadata={"help": "positive item id column"})
    history_column: str = field(default="history", metadata={"help": "history item ids column"})
    row_index_column: str = field(default="row_index", metadata={"help": "row of cm_scores (optional column)"})
    max_prompt_length: int = field(default=512, metadata={"help": "left-truncate prompts to this many tokens"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the GFlowGR columns"})
    report_to: str | list[str] = field(default="none", metadata={"help": "logging integrations"})

    def __post_init__(self):
        super().__post_init__()
        choices = {
            "gfn_loss": GFN_LOSSES,
            "log_z": LOG_Z_MODES,
            "sampling_strategy": STRATEGIES,
            "score_source": SCORE_SOURCES,
            "reward_fusion": FUSIONS,
            "reward_similarity": SIMILARITIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.gfn_lambda >= 0:
            raise ValueError(f"`gfn_lambda` must be >= 0 (0 = SFT only; the paper's best is 1), got {self.gfn_lambda}")
        if self.num_augmented < 0:
            raise ValueError(f"`num_augmented` must be >= 0 (augmented items per positive), got {self.num_augmented}")
        if not self.head_lr_multiplier > 0:
            raise ValueError(f"`head_lr_multiplier` must be > 0, got {self.head_lr_multiplier}")
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns=True` would drop the prompt/item/history columns GFlowGRTrainer reads; "
                "set it to False"
            )
