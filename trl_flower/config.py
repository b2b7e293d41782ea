"""`FlowerConfig`: the training arguments of [`FlowerTrainer`] (a `trl.GRPOConfig` with Flower's fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import GRPOConfig

from trl_flower._trl_compat import grpo_post_init_with_one_generation

FLOW_LOSSES = ("flower_subtb", "db", "tb", "full_distribution")
REWARD_VARIANTS = ("none", "div_s", "add_logs", "exact", "distill")
PATH_FLOW_LOSSES = ("flower_subtb", "db", "tb")  # losses on the sampled path's states (state_granularity applies)
TOKENIZATION_MODES = ("default", "reference")
POLICY_SUPPORTS = ("vocabulary", "tree")


@dataclass
class FlowerConfig(GRPOConfig):
    r"""
    Configuration class for the [`FlowerTrainer`] (Flower, [Process-Supervised LLM Recommenders via Flow-guided
    Tuning](https://huggingface.co/papers/2503.07377)).

    [`FlowerConfig`] inherits every parameter from [`GRPOConfig`]. It adds the Flower objective
    loss = (1 − λ)·SFT + λ·flow loss, the token-level rewards on the item prefix tree, and the dataset columns that
    hold the target item; and it changes defaults so that one trie-constrained trajectory per prompt is sampled
    (`num_generations=1`, which GRPOConfig rejects), at temperature 1, without KL penalty, with an SFT-sized learning
    rate, without gradient checkpointing, and with bf16 only where the hardware supports it. GRPO's policy-gradient
    settings (`loss_type`, `epsilon`, `scale_rewards`, `importance_sampling_level`, `top_entropy_quantile`, ...) are
    not used by FlowerTrainer. `report_to` keeps the transformers default `"none"`.

    Parameters:
        > Parameters that control the Flower objective

        flow_lambda (`float`, *optional*, defaults to `0.005`):
            Weight λ of the flow loss in loss = (1 − λ)·SFT + λ·flow (paper Eq. 12; the official scripts use
            λ = 1 − train_theta). Must lie in [0, 1]. The paper searches 1e-2 … 1e-4 and uses 0.005 for CDs and
            Movies, 0.0005 for Video Games. With 0 the trainer is plain SFT and samples nothing.
        flow_loss (`str`, *optional*, defaults to `"flower_subtb"`):
            Flow-balance loss on the sampled items: `"flower_subtb"` (the official "modified SubTB": all
            subtrajectories with termination terms), `"db"` (detailed balance), `"tb"` (trajectory balance) or
            `"full_distribution"` (KL between the process reward and the policy over all children of every visited
            prefix).
        subtb_lambda (`float`, *optional*, defaults to `1.0`):
            Subtrajectory weighting λ_sub of `"flower_subtb"`: a segment of length n is weighted by λ_sub^(n − 1)
            (normalised). The official runs use 1, a plain mean over all segments. Must be >= 0.
        state_granularity (`int`, *optional*, defaults to `1`):
            Tokens per GFlowNet state n (the paper's RQ4): the states of the path losses are the chunk boundaries
            s_0, s_n, s_2n, …, s_t; a chunk's forward log-probability is the sum of its tokens' and the termination
            terms count at the chunk starts and at s_t. 1 is the token-level loss; n longer than every title leaves
            one segment (s_0, s_t), a trajectory-balance-like loss. Not used by `"full_distribution"`.
        nonterminal_log_term (`float`, *optional*, defaults to `-15.0`):
            Target log-probability of the terminator at every prefix before the end of the sampled title (the
            official e^-15 constant, log ρ). A log-probability, so it must be < 0.
        title_log_term (`str`, *optional*, defaults to `"official"`):
            Termination target at a prefix before the sampled title's end that is itself a complete title:
            `"official"` uses `nonterminal_log_term` there (as the official code; the SubTB loss then cannot reach 0
            and pushes π(⊤|title) towards 0), `"flow"` uses that title's own log R/F (consistent with the flows).
        flow_policy_support (`str`, *optional*, defaults to `"vocabulary"`):
            Which probabilities the flow loss matches to the flow ratios: `"vocabulary"` uses π(a|s) over the whole
            vocabulary (the official code; mass off the tree is not penalised by SubTB), `"tree"` renormalises π over
            the tree's children of each visited state, the distribution that trie-constrained decoding uses;
            termination terms then only count at states where ⊤ is a child (use it with title_log_term="flow").
        offline_trajectory_prob (`float`, *optional*, defaults to `0.0`):
            Probability that a generation batch trains the flow loss on the dataset's target items, teacher-forced,
            instead of on-policy samples. Flow-balance losses are valid off-policy, and offline paths reach titles a
            peaked policy would not sample yet; the official RQ1 GFlowNet starts at 1 and lowers it during training.
            0 (default): always on-policy, as in the paper's recommendation runs. Needs tokenization_mode="default".
        offline_trajectory_prob_final (`float`, *optional*):
            If set, the offline probability moves linearly from `offline_trajectory_prob` at the first step to this
            value at the last one (`max_steps`, or the planned steps of the epochs). None: constant.

        > Parameters that control the rewards

        reward_variant (`str`, *optional*, defaults to `"none"`):
            Personalisation of the token rewards by an auxiliary recommender's scores s(u, i): `"none"` (item
            popularity only), `"div_s"` (the paper's main variant: log rewards divided by s), `"add_logs"` (log s
            added to every log reward), `"exact"` (per-user rewards R(i)·s(u, i) pushed through the tree) or
            `"distill"` (per-user rewards (R(i) + ε)^α · softmax(logits / τ)^β pushed through the tree: the auxiliary
            recommender's distribution distilled into the flows; ours, see `docs/tree_and_rewards.md`). All but
            `"none"` need `preference_scores_path`.
        distill_alpha (`float`, *optional*, defaults to `1.0`):
            α of `reward_variant="distill"`: exponent of the item reward (popularity) R(i) + ε. 0 ignores popularity;
            1 with `distill_beta=0` gives back the `"none"` flows. Must be >= 0.
        distill_beta (`float`, *optional*, defaults to `1.0`):
            β of `reward_variant="distill"`: exponent of the auxiliary recommender's probability p_u(i) =
            softmax(logits_u / τ)_i of the training row. 0 ignores the recommender. Must be >= 0.
        distill_temperature (`float`, *optional*, defaults to `1.0`):
            τ of `reward_variant="distill"`: softmax temperature of the recommender's logits (> 1 flattens, < 1
            sharpens its distribution). Must be > 0.
        distill_epsilon (`float`, *optional*, defaults to `0.0`):
            ε of `reward_variant="distill"`, added to R(i) before the power α, so that items without interactions
            get a share. Must be >= 0.
        distill_top_n (`int`, *optional*, defaults to `0`):
            `reward_variant="distill"` on big catalogues: keep each row's n most preferred items by p_u and give the
            others one shared floor probability (their mean), so the per-batch flow memory is O(batch · n · depth)
            instead of O(batch · tree nodes). 0: exact dense flows. n >= the item count equals dense.
        preference_scores_path (`str`, *optional*):
            Path to a `.npy` file of auxiliary-model logits (e.g. SASRec's) of shape [number of training rows,
            number of items]; row u belongs to the dataset rows whose `row_index_column` is u. It is memory-mapped;
            only the rows of each batch are read.
        row_index_column (`str`, *optional*, defaults to `"row_index"`):
            Dataset column holding each prompt's row in the preference scores. Needed only by the personalised
            reward variants.

        > Parameters that control the data and tokenisation

        item_id_column (`str`, *optional*, defaults to `"item_id"`):
            Dataset column holding the target item id (an index into the prefix tree's items) of each prompt: the SFT
            target.
        tokenization_mode (`str`, *optional*, defaults to `"default"`):
            `"default"`: one tokenisation everywhere; the SFT target is the item's tree path (title tokens, then the
            terminator, which must be an EOS token). `"reference"`: the official code's split, for comparisons; the
            tree ends titles with its own terminator (e.g. "\n"), sampling appends EOS after it, and the SFT target is
            the dataset's `completion` column tokenised, followed by EOS.

        > Parameters that control sampling (defaults differ from GRPOConfig)

        num_generations (`int`, *optional*, defaults to `1`):
            Number of trie-constrained trajectories sampled per prompt. The paper samples one. With more, each
            prompt's SFT target is repeated as often (same expectation, more compute).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the on-policy trajectories. 1 samples from the policy itself, as the paper does.
            Must be > 0.
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient of GRPO. Flower's objective has no KL term, so it must stay 0.

        > Parameters that control training (defaults differ from GRPOConfig)

        learning_rate (`float`, *optional*, defaults to `3e-4`):
            Initial learning rate for AdamW. The paper's value (full fine-tuning of Qwen2.5-1.5B, batch 128, 20 warmup
            steps); GRPO's 1e-6 is an RL value, far too small for the SFT part.
        gradient_checkpointing (`bool`, *optional*):
            Whether to enable gradient checkpointing (transformers >= 5.23 calls it `activation_checkpointing`, also
            accepted). Off when not set: the trainer runs the prompt once and both
            continuations (SFT target and sample) on its KV cache, which checkpointing disables; with it on, the
            trainer falls back to a forward over [prompt + target ; prompt + sample] (same loss, more compute, less
            memory).
        bf16 (`bool`, *optional*):
            Whether to use bf16 mixed precision. If not set, it is `True` only when `fp16` is not set and the hardware
            supports bf16 (a bf16-capable GPU, XLA, or `use_cpu=True`), so the defaults also run on a CPU-only
            machine.
    """

    # > Parameters that control the Flower objective
    flow_lambda: float = field(
        default=0.005,
        metadata={
            "help": "Weight λ of the flow loss in loss = (1 − λ)·SFT + λ·flow (paper Eq. 12; the official scripts use "
            "λ = 1 − train_theta). Must lie in [0, 1]. The paper searches 1e-2 … 1e-4 and uses 0.005 for CDs and "
            "Movies, 0.0005 for Video Games. With 0 the trainer is plain SFT and samples nothing."
        },
    )
    flow_loss: str = field(
        default="flower_subtb",
        metadata={
            "help": 'Flow-balance loss on the sampled items: `"flower_subtb"` (the official "modified SubTB": all '
            'subtrajectories with termination terms), `"db"` (detailed balance), `"tb"` (trajectory balance) or '
            '`"full_distribution"` (KL between the process reward and the policy over all children of every visited '
            "prefix).",
            "choices": list(FLOW_LOSSES),
        },
    )
    subtb_lambda: float = field(
        default=1.0,
        metadata={
            "help": 'Subtrajectory weighting λ_sub of `"flower_subtb"`: a segment of length n is weighted by '
            "λ_sub^(n − 1) (normalised). The official runs use 1, a plain mean over all segments. Must be >= 0."
        },
    )
    state_granularity: int = field(
        default=1,
        metadata={
            "help": "Tokens per GFlowNet state n (the paper's RQ4): the states of the path losses are the chunk "
            "boundaries s_0, s_n, s_2n, …, s_t; a chunk's forward log-probability is the sum of its tokens' and the "
            "termination terms count at the chunk starts and at s_t. 1 is the token-level loss; n longer than every "
            'title leaves one segment (s_0, s_t), a trajectory-balance-like loss. Not used by `"full_distribution"`.'
        },
    )
    nonterminal_log_term: float = field(
        default=-15.0,
        metadata={
            "help": "Target log-probability of the terminator at every prefix before the end of the sampled title (the "
            "official e^-15 constant, log ρ). A log-probability, so it must be < 0."
        },
    )
    title_log_term: str = field(
        default="official",
        metadata={
            "help": "Termination target at a prefix before the sampled title's end that is itself a complete title: "
            '`"official"` uses `nonterminal_log_term` there (as the official code; the SubTB loss then cannot reach 0 '
            'and pushes π(⊤|title) towards 0), `"flow"` uses that title\'s own log R/F (consistent with the flows).',
            "choices": ["official", "flow"],
        },
    )
    flow_policy_support: str = field(
        default="vocabulary",
        metadata={
            "help": 'Which probabilities the flow loss matches to the flow ratios: `"vocabulary"` uses π(a|s) over the '
            'whole vocabulary (the official code; mass off the tree is not penalised by SubTB), `"tree"` renormalises '
            "π over the tree's children of each visited state, the distribution that trie-constrained decoding uses; "
            'termination terms then only count at states where ⊤ is a child (use it with title_log_term="flow").',
            "choices": list(POLICY_SUPPORTS),
        },
    )

    offline_trajectory_prob: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a generation batch trains the flow loss on the dataset's target items, "
            "teacher-forced, instead of on-policy samples. Flow-balance losses are valid off-policy, and offline "
            "paths reach titles a peaked policy would not sample yet; the official RQ1 GFlowNet starts at 1 and "
            "lowers it during training. 0 (default): always on-policy, as in the paper's recommendation runs. Needs "
            'tokenization_mode="default".'
        },
    )
    offline_trajectory_prob_final: float | None = field(
        default=None,
        metadata={
            "help": "If set, the offline probability moves linearly from `offline_trajectory_prob` at the first step "
            "to this value at the last one (`max_steps`, or the planned steps of the epochs). None: constant."
        },
    )

    # > Parameters that control the rewards
    reward_variant: str = field(
        default="none",
        metadata={
            "help": 'Personalisation of the token rewards by an auxiliary recommender\'s scores s(u, i): `"none"` '
            '(item popularity only), `"div_s"` (the paper\'s main variant: log rewards divided by s), `"add_logs"` '
            '(log s added to every log reward), `"exact"` (per-user rewards R(i)·s(u, i) pushed through the tree) or '
            '`"distill"` (per-user rewards (R(i) + ε)^α · softmax(logits / τ)^β pushed through the tree: the '
            "auxiliary recommender's distribution distilled into the flows; ours, see `docs/tree_and_rewards.md`). "
            'All but `"none"` need `preference_scores_path`.',
            "choices": list(REWARD_VARIANTS),
        },
    )
    distill_alpha: float = field(
        default=1.0,
        metadata={
            "help": 'α of `reward_variant="distill"`: exponent of the item reward (popularity) R(i) + ε. 0 ignores '
            'popularity; 1 with `distill_beta=0` gives back the `"none"` flows. Must be >= 0.'
        },
    )
    distill_beta: float = field(
        default=1.0,
        metadata={
            "help": 'β of `reward_variant="distill"`: exponent of the auxiliary recommender\'s probability p_u(i) = '
            "softmax(logits_u / τ)_i of the training row. 0 ignores the recommender. Must be >= 0."
        },
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={
            "help": 'τ of `reward_variant="distill"`: softmax temperature of the recommender\'s logits (> 1 flattens, '
            "< 1 sharpens its distribution). Must be > 0."
        },
    )
    distill_epsilon: float = field(
        default=0.0,
        metadata={
            "help": 'ε of `reward_variant="distill"`, added to R(i) before the power α, so that items without '
            "interactions get a share. Must be >= 0."
        },
    )
    distill_top_n: int = field(
        default=0,
        metadata={
            "help": '`reward_variant="distill"` on big catalogues: keep each row\'s n most preferred items by p_u and '
            "give the others one shared floor probability (their mean), so the per-batch flow memory is "
            "O(batch · n · depth) instead of O(batch · tree nodes). 0: exact dense flows. n >= the item count "
            "equals dense."
        },
    )
    preference_scores_path: str | None = field(
        default=None,
        metadata={
            "help": "Path to a `.npy` file of auxiliary-model logits (e.g. SASRec's) of shape [number of training "
            "rows, number of items]; row u belongs to the dataset rows whose `row_index_column` is u. It is "
            "memory-mapped; only the rows of each batch are read."
        },
    )
    row_index_column: str = field(
        default="row_index",
        metadata={
            "help": "Dataset column holding each prompt's row in the preference scores. Needed only by the "
            "personalised reward variants."
        },
    )

    # > Parameters that control the data and tokenisation
    item_id_column: str = field(
        default="item_id",
        metadata={
            "help": "Dataset column holding the target item id (an index into the prefix tree's items) of each "
            "prompt: the SFT target."
        },
    )
    tokenization_mode: str = field(
        default="default",
        metadata={
            "help": '`"default"`: one tokenisation everywhere; the SFT target is the item\'s tree path (title tokens, '
            'then the terminator, which must be an EOS token). `"reference"`: the official code\'s split, for '
            'comparisons; the tree ends titles with its own terminator (e.g. "\\n"), sampling appends EOS after it, '
            "and the SFT target is the dataset's `completion` column tokenised, followed by EOS.",
            "choices": list(TOKENIZATION_MODES),
        },
    )

    # > Parameters that control sampling (defaults differ from GRPOConfig)
    num_generations: int = field(
        default=1,
        metadata={
            "help": "Number of trie-constrained trajectories sampled per prompt. The paper samples one. With more, "
            "each prompt's SFT target is repeated as often (same expectation, more compute)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the on-policy trajectories. 1 samples from the policy itself, as the "
            "paper does. Must be > 0."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient of GRPO. Flower's objective has no KL term, so it must stay 0."},
    )

    # > Parameters that control training (defaults differ from GRPOConfig)
    learning_rate: float = field(
        default=3e-4,
        metadata={
            "help": "Initial learning rate for AdamW. The paper's value (full fine-tuning of Qwen2.5-1.5B, batch 128, "
            "20 warmup steps); GRPO's 1e-6 is an RL value, far too small for the SFT part."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to enable gradient checkpointing (transformers >= 5.23 calls it "
            "`activation_checkpointing`, also accepted). Off when not set: the trainer runs the prompt once and both "
            "continuations (SFT target and sample) on its KV cache, which checkpointing disables; with it on, the "
            "trainer falls back to a forward over [prompt + target ; prompt + sample] (same loss, more compute, less "
            "memory)."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to use bf16 mixed precision. If not set, it is `True` only when `fp16` is not set and the "
            "hardware supports bf16 (a bf16-capable GPU, XLA, or `use_cpu=True`), so the defaults also run on a "
            "CPU-only machine."
        },
    )

    def __post_init__(self):
        self._check_flower_fields()
        self._check_grpo_fields()
        if self.bf16 is None:
            self.bf16 = not self.fp16 and (self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available())
        if self.num_generations == 1:
            grpo_post_init_with_one_generation(self, super().__post_init__)
        else:
            super().__post_init__()
        if self.gradient_checkpointing is None:  # transformers < 5.23: no activation_checkpointing alias resolved it
            self.gradient_checkpointing = False

    def _check_flower_fields(self) -> None:
        if not 0.0 <= self.flow_lambda <= 1.0:  # also rejects NaN
            raise ValueError(
                f"flow_lambda={self.flow_lambda} is outside [0, 1]: it is the weight λ of the flow loss in "
                "(1 − λ)·SFT + λ·flow. Use a value in [0, 1]; the paper uses 0.005 (CDs, Movies) or 0.0005 (Games)."
            )
        if self.flow_loss not in FLOW_LOSSES:
            raise ValueError(f"flow_loss={self.flow_loss!r} is not one of {FLOW_LOSSES}; pick one of them.")
        if not (math.isfinite(self.subtb_lambda) and self.subtb_lambda >= 0):
            raise ValueError(
                f"subtb_lambda={self.subtb_lambda} must be a finite number >= 0: segments of length n are weighted by "
                "subtb_lambda^(n-1). Use 1.0 (the official value) for a plain mean over all segments."
            )
        if not (math.isfinite(self.nonterminal_log_term) and self.nonterminal_log_term < 0):
            raise ValueError(
                f"nonterminal_log_term={self.nonterminal_log_term} must be a finite number < 0: it is the target "
                "log-probability of ending the title early, and log-probabilities are <= 0 (0 would ask for certain "
                "termination before every title's end). Use the official -15.0."
            )
        if isinstance(self.state_granularity, bool) or not (
            isinstance(self.state_granularity, int) and self.state_granularity >= 1
        ):
            raise ValueError(
                f"state_granularity={self.state_granularity!r} must be an integer >= 1 (tokens per GFlowNet state; "
                "1 = token level, the paper's default)."
            )
        if self.state_granularity > 1 and self.flow_loss not in PATH_FLOW_LOSSES:
            raise ValueError(
                f"state_granularity={self.state_granularity} chunks the states of a sampled path, but "
                f"flow_loss={self.flow_loss!r} matches whole child distributions at every token state; use "
                f"state_granularity=1 or one of {PATH_FLOW_LOSSES}."
            )
        if self.title_log_term not in ("official", "flow"):
            raise ValueError(f"title_log_term={self.title_log_term!r} is not 'official' or 'flow'; pick one of them.")
        if self.flow_policy_support not in POLICY_SUPPORTS:
            raise ValueError(
                f"flow_policy_support={self.flow_policy_support!r} is not one of {POLICY_SUPPORTS}; pick one of them."
            )
        for name in ("offline_trajectory_prob", "offline_trajectory_prob_final"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{name}={value} is a probability; use a value in [0, 1].")
        if (self.offline_trajectory_prob > 0 or self.offline_trajectory_prob_final) and (
            self.tokenization_mode != "default"
        ):
            raise ValueError(
                "offline trajectories teacher-force the target item's tree path, which only exists with "
                'tokenization_mode="default"; set offline_trajectory_prob=0 or use the default tokenisation.'
            )
        if self.reward_variant not in REWARD_VARIANTS:
            raise ValueError(f"reward_variant={self.reward_variant!r} is not one of {REWARD_VARIANTS}; pick one.")
        if self.reward_variant != "none" and self.preference_scores_path is None:
            raise ValueError(
                f"reward_variant={self.reward_variant!r} personalises the rewards with auxiliary-model scores s(u, i), "
                "but preference_scores_path is not set. Set it to a .npy file of logits [training rows, items], or "
                "use reward_variant='none'."
            )
        self._check_distill_fields()
        if self.reward_variant == "none" and self.preference_scores_path is not None:
            raise ValueError(
                "preference_scores_path is set but reward_variant='none' ignores it; choose a personalised "
                "reward_variant ('div_s', 'add_logs', 'exact' or 'distill') or unset preference_scores_path."
            )
        if self.tokenization_mode not in TOKENIZATION_MODES:
            raise ValueError(
                f"tokenization_mode={self.tokenization_mode!r} is not one of {TOKENIZATION_MODES}; use 'default' "
                "(one tokenisation everywhere) or 'reference' (the official code's split)."
            )

    def _check_distill_fields(self) -> None:
        defaults = {"distill_alpha": 1.0, "distill_beta": 1.0, "distill_temperature": 1.0, "distill_epsilon": 0.0}
        changed = [name for name, value in defaults.items() if getattr(self, name) != value]
        changed += ["distill_top_n"] if self.distill_top_n != 0 else []
        if changed and self.reward_variant != "distill":
            raise ValueError(
                f"{', '.join(changed)} only apply to reward_variant='distill', but reward_variant="
                f"{self.reward_variant!r}; set reward_variant='distill' or leave them at their defaults."
            )
        for name in ("distill_alpha", "distill_beta", "distill_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0 (an exponent or offset of R_u(i)).")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ValueError(
                f"distill_temperature={self.distill_temperature} must be a finite number > 0 (softmax temperature τ "
                "of the recommender's logits); use 1.0 for its own distribution."
            )
        if self.distill_top_n < 0:
            raise ValueError(
                f"distill_top_n={self.distill_top_n} must be 0 (dense flows) or >= 1 (items kept per row)."
            )

    def distilled_reward(self):
        """The `DistilledReward` of `reward_variant="distill"` built from the `distill_*` fields (None otherwise)."""
        if self.reward_variant != "distill":
            return None
        from trl_flower.user_flows import DistilledReward

        return DistilledReward(
            alpha=self.distill_alpha,
            beta=self.distill_beta,
            temperature=self.distill_temperature,
            epsilon=self.distill_epsilon,
            top_n=self.distill_top_n,
        )

    def _check_grpo_fields(self) -> None:
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True is not supported: the prefix-tree constraint is a token-level logits processor that "
                "only transformers' generate accepts (vLLM constrains strings, which may tokenise off the tree). Set "
                "use_vllm=False."
            )
        continuous = getattr(self, "use_transformers_continuous_batching", False)
        if continuous or getattr(self, "use_transformers_paged", False):
            raise ValueError(
                "use_transformers_continuous_batching (or use_transformers_paged) is not supported: continuous "
                "batching rejects the stateful trie logits processor that keeps samples on catalogue items. Set it to "
                "False."
            )
        if self.beta != 0.0:
            raise ValueError(
                f"beta={self.beta} adds GRPO's KL penalty, which is not part of Flower's objective and would be "
                "computed but never used. Set beta=0.0 (Flower regularises through the SFT term, weight 1 − λ)."
            )
        if self.num_iterations != 1:
            raise ValueError(
                f"num_iterations={self.num_iterations} would reuse each sampled batch (and its SFT targets) for "
                "several updates; Flower takes one step per fresh on-policy batch. Set num_iterations=1."
            )
        if self.num_generations is None or self.num_generations < 1:
            raise ValueError(
                f"num_generations={self.num_generations} must be >= 1 (trajectories sampled per prompt); Flower uses 1."
            )
        self._check_sampling_and_batch_fields()

    def _check_sampling_and_batch_fields(self) -> None:
        """Sampling and batch sizes that GRPOConfig accepts but that fail (or do nothing) only inside `train()`."""
        temperature = self.temperature
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"temperature={self.temperature} must be a finite number > 0: the on-policy items are sampled from "
                "softmax(logits / temperature), which is undefined at 0 (greedy decoding is not a sample of the "
                "policy) and inverted below it. Use 1.0 (the policy itself, as the paper does)."
            )
        if self.max_completion_length is not None and not _is_positive_int(self.max_completion_length):
            raise ValueError(
                f"max_completion_length={self.max_completion_length!r} must be an integer >= 1 (tokens per sampled "
                "item, terminator included): with 0 no item could ever end. Set it to at least the longest item path "
                "(`int(tree.item_length.max())`), or None."
            )
        batch_fields = {
            "per_device_train_batch_size": "prompts per device and micro-batch",
            "per_device_eval_batch_size": "prompts per device in evaluation",
            "gradient_accumulation_steps": "micro-batches per optimiser step",
        }
        for name, what in batch_fields.items():
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(
                    f"{name}={value!r} must be an integer >= 1 ({what}; with 0 nothing is trained and the failure "
                    "only shows inside train()). Use 1 or more."
                )
        for name in ("generation_batch_size", "steps_per_generation"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name}={value!r} must be an integer >= 1, or None to derive it from the batch size.")


def _is_positive_int(value: Any) -> bool:
    """Whether `value` is an integer (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
