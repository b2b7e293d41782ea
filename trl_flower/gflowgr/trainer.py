r"""`GFlowGRTrainer`: GFlowNet fine-tuning of a semantic-ID generative recommender (arXiv 2506.16114).

The only change w.r.t. [`transformers.Trainer`] is `compute_loss` (plus the plumbing for the extra parameters):

    L(U, v) = L_GR(U, v) + λ Σ_{n=1}^{N+1} L_GFN(τ_n),     L_GR(U, v) = −Σ_l log P_GR(t_l | U, t_<l)  (positive only)

per training row, averaged over rows. τ_1 is the positive item v, τ_2 … τ_{N+1} come from the
:class:`~trl_flower.gflowgr.sampler.TrajectorySampler`; R is the
:class:`~trl_flower.gflowgr.reward.GFlowGRReward`. A trajectory is the item's full token path (its L + 1 code
tokens and the EOS terminator). L_GFN is

* ``tb``: (log Z(U) + log P_GR(τ) − log R)² via :func:`trl_flower.losses.trajectory_balance_loss`, with log Z(U)
  a linear head on the hidden state of the last prompt token (``log_z="prompt"``) or one scalar (``"scalar"``);
* ``db``: :func:`~trl_flower.gflowgr.losses.learned_flow_db_loss`, log F(s_l) a linear head on the hidden state of
  the position that emits token l + 1, F(s_T) = R.

All N + 1 trajectories of a row go through one forward pass as N + 1 rows (prompt repeated; every path has the same
length, so there is no right padding). The flow / log Z heads and the learnable reward weights live in
``trainer.gfn_modules``, *not* in the model: ``save_model`` writes a clean CausalLM directory (reloadable with
``AutoModelForCausalLM``) and the heads separately in ``gflowgr_heads.pt``, next to the semantic IDs and the tree.

Dataset columns (names in :class:`GFlowGRConfig`): ``prompt`` (str, the rendered prompt; histories are usually
written with :meth:`SemanticIDs.item_strings`), ``item_id`` (int, the positive), ``history`` (list[int]), optional
``row_index`` (int, row of ``cm_scores``; default: position in the dataset, use an explicit column when shuffling
is on, which it is by default in `Trainer`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer

from trl_flower.gflowgr.config import GFlowGRConfig
from trl_flower.gflowgr.losses import learned_flow_db_loss
from trl_flower.gflowgr.reward import GFlowGRReward
from trl_flower.gflowgr.sampler import TrajectorySampler, pad_histories
from trl_flower.gflowgr.semantic_ids import SemanticIDs
from trl_flower.losses import trajectory_balance_loss

__all__ = ["GFlowGRHeads", "GFlowGRTrainer", "HEADS_FILE", "INFO_FILE", "TREE_FILE"]

HEADS_FILE = "gflowgr_heads.pt"
TREE_FILE = "gflowgr_tree.npz"
INFO_FILE = "gflowgr_config.json"


class GFlowGRHeads(nn.Module):
    """Learned log Z (a linear head on a hidden state, a scalar, or none) and state-flow head log F(s) (DB only)."""

    def __init__(self, hidden_size: int, log_z: str | None = "prompt", flow: bool = False) -> None:
        super().__init__()
        self.log_z_head = nn.Linear(hidden_size, 1) if log_z == "prompt" else None
        self.log_z_scalar = nn.Parameter(torch.zeros(())) if log_z == "scalar" else None
        self.flow_head = nn.Linear(hidden_size, 1) if flow else None

    def log_z(self, h: torch.Tensor) -> torch.Tensor:
        """[B] log Z(U) from the prompt's last hidden state h [B, H]."""
        if self.log_z_head is not None:
            return self.log_z_head(h.float()).squeeze(-1)
        return self.log_z_scalar.expand(h.shape[0])

    def log_flow(self, h: torch.Tensor) -> torch.Tensor:
        """[..., T] log F(s) from hidden states [..., T, H]."""
        return self.flow_head(h.float()).squeeze(-1)


class GFlowGRTrainer(Trainer):
    """Trainer for GFlowGR (see the module docstring).

    Args:
        model: a causal LM (or a path); code tokens are added to its vocabulary here if missing.
        args: :class:`GFlowGRConfig` (default: one writing to ``"gflowgr-output"``).
        semantic_ids: the items' :class:`SemanticIDs` (required).
        cm_scores: [num_rows, num_items] collaborative-model scores per training row (e.g. SASRec ``score_rows``);
            needed by the ``curriculum`` sampler and ``score_source="cm"``.
        train_dataset, eval_dataset, processing_class, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(
        self,
        model,
        args: GFlowGRConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        semantic_ids: SemanticIDs | None = None,
        cm_scores: torch.Tensor | np.ndarray | None = None,
        **kwargs,
    ) -> None:
        if args is None:
            args = GFlowGRConfig(output_dir="gflowgr-output")
        if semantic_ids is None:
            raise ValueError("GFlowGRTrainer needs `semantic_ids` (see trl_flower.gflowgr.fit_semantic_ids)")
        if processing_class is None:
            raise ValueError("GFlowGRTrainer needs the tokenizer as `processing_class`")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        needs_cm = args.score_source == "cm" or (args.sampling_strategy == "curriculum" and args.num_augmented > 0)
        if needs_cm and cm_scores is None:
            raise ValueError(
                f"sampling_strategy={args.sampling_strategy!r} / score_source={args.score_source!r} need "
                "`cm_scores` [num_rows, num_items] (e.g. SASRec.score_rows); pass them, or use "
                "sampling_strategy='random' and score_source='model' or 'none'"
            )
        tok = processing_class
        semantic_ids.add_code_tokens(tok, model)
        self.semantic_ids = semantic_ids
        self.terminator_id = tok.eos_token_id
        self.tree = semantic_ids.build_tree(self.terminator_id)
        paths = np.concatenate(
            [semantic_ids.item_token_ids(), np.full((semantic_ids.num_items, 1), self.terminator_id)], axis=1
        )
        self.item_paths = torch.as_tensor(paths, dtype=torch.long)  # [M, T]: L + 1 codes and ⊤
        self.cm_scores = None if cm_scores is None else torch.as_tensor(np.asarray(cm_scores), dtype=torch.float32)
        if self.cm_scores is not None and self.cm_scores.shape[1] != semantic_ids.num_items:
            raise ValueError(
                f"`cm_scores` must have one column per item ({semantic_ids.num_items}), "
                f"got {tuple(self.cm_scores.shape)}"
            )
        self.sampler = TrajectorySampler(
            semantic_ids.num_items,
            args.num_augmented,
            args.sampling_strategy,
            seed=args.seed,
            curriculum_window=args.curriculum_window,
        )
        reward = GFlowGRReward(
            semantic_ids.codes,
            num_levels=semantic_ids.num_levels,
            reward_positive=args.reward_positive,
            reward_logged=args.reward_logged,
            reward_unobserved=args.reward_unobserved,
            score_source=args.score_source,
            fusion=args.reward_fusion,
            epsilon=args.reward_epsilon,
            similarity=args.reward_similarity,
        )
        heads = GFlowGRHeads(
            model.config.hidden_size, args.log_z if args.gfn_loss == "tb" else None, flow=args.gfn_loss == "db"
        )
        self.gfn_modules = nn.ModuleDict({"heads": heads, "reward": reward})
        self._gfn_metrics: dict[str, list[float]] = defaultdict(list)
        kwargs.setdefault("data_collator", self._collate)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tok,
            **kwargs,
        )
        self.gfn_modules.to(self.args.device)
        self.model_accepts_loss_kwargs = False  # our loss is already a per-row mean

    # ------------------------------------------------------------------ data

    def _collate(self, features: list[dict]) -> dict:
        a = self.args
        rows = [f.get(a.row_index_column, -1) for f in features]
        return {
            "prompt": [f[a.prompt_column] for f in features],
            "item_id": torch.tensor([int(f[a.item_id_column]) for f in features], dtype=torch.long),
            "history": pad_histories([list(f[a.history_column]) for f in features]),
            "row_index": torch.tensor([int(r) for r in rows], dtype=torch.long),
        }

    # ------------------------------------------------------------------ optimisation

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = [p for p in self.gfn_modules.parameters() if p.requires_grad]
        if params and not getattr(self, "_gfn_group_added", False):
            optimizer.add_param_group(
                {"params": params, "lr": self.args.learning_rate * self.args.head_lr_multiplier, "weight_decay": 0.0}
            )
            self._gfn_group_added = True
        return optimizer

    def _beam_items(self, model, prompts: list[str]) -> torch.Tensor:
        from trl_flower.evaluation.recommend import recommend

        unwrapped = self.accelerator.unwrap_model(model)
        k = min(self.args.num_augmented + 1, int(self.tree.is_terminal.sum()))
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            recs = recommend(
                unwrapped,
                self.processing_class,
                prompts,
                self.tree,
                top_k=k,
                num_beams=max(self.args.beam_width or k, k),
                batch_size=len(prompts),
                show_progress=False,
            )
        finally:
            unwrapped.train(was_training)
        return torch.as_tensor(recs.item_ids)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        prompts, positives, histories = inputs["prompt"], inputs["item_id"].cpu(), inputs["history"].cpu()
        B, N = len(prompts), a.num_augmented
        K = N + 1
        scores = None
        if self.cm_scores is not None:
            rows = inputs["row_index"].cpu()
            if bool((rows < 0).any()):
                raise ValueError(f"cm_scores need a `{a.row_index_column}` column (row of cm_scores per example)")
            scores = self.cm_scores[rows]  # [B, M]
        progress = min(1.0, self.state.global_step / max(self.state.max_steps, 1))
        beam = self._beam_items(model, prompts) if a.sampling_strategy == "beam" and N > 0 else None
        items = self.sampler.sample(positives, histories, scores=scores, progress=progress, beam_items=beam)  # [B, K]

        # one forward over B·K rows: left-padded prompt (P tokens) followed by the item path (T tokens)
        device = self.args.device
        enc = self.processing_class(
            prompts,
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=a.max_prompt_length,
            truncation_side="left",
            return_tensors="pt",
        )
        P, T = enc["input_ids"].shape[1], self.item_paths.shape[1]
        paths = self.item_paths[items.reshape(-1)]  # [B*K, T]
        input_ids = torch.cat([enc["input_ids"].repeat_interleave(K, 0), paths], 1).to(device)  # [B*K, P+T]
        attention = torch.cat([enc["attention_mask"].repeat_interleave(K, 0), torch.ones_like(paths)], 1).to(device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # as in generate(): left padding does not shift
        need_h = a.gfn_loss != "none" and (a.gfn_loss == "db" or a.log_z == "prompt")
        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids, output_hidden_states=need_h
        )
        logits = out.logits[:, P - 1 : P + T - 1].float()  # [B*K, T]: the states s_0 … s_{T-1}
        log_pf = torch.log_softmax(logits, -1).gather(-1, paths.to(device)[..., None]).squeeze(-1)  # [B*K, T]
        traj = log_pf.sum(-1).view(B, K)  # [B, K] log P_GR(τ)
        sft = -traj[:, 0].mean()
        loss = sft
        self._gfn_metrics["sft_loss"].append(sft.item())
        if a.gfn_loss != "none":
            log_r, parts = self.gfn_modules["reward"](
                items.to(device), positives.to(device), histories.to(device), scores=scores, traj_log_probs=traj
            )
            heads = self.gfn_modules["heads"]
            hidden = out.hidden_states[-1] if need_h else None
            if hidden is not None and a.detach_head_inputs:
                hidden = hidden.detach()  # the heads fit log Z / log F without reshaping the LM's states
            if a.gfn_loss == "tb":
                h0 = hidden[:, P - 1] if a.log_z == "prompt" else log_pf.new_zeros(B * K, 1)
                log_z = heads.log_z(h0)  # [B*K] (identical across a row's K copies of the prompt)
                gfn = K * trajectory_balance_loss(traj.reshape(-1), log_r.reshape(-1), log_z)
                self._gfn_metrics["log_z"].append(log_z.mean().item())
            else:
                log_flow = heads.log_flow(hidden[:, P - 1 : P + T - 1])  # [B*K, T]
                gfn = K * learned_flow_db_loss(log_flow, log_pf, log_r.reshape(-1))
            loss = sft + a.gfn_lambda * gfn
            self._gfn_metrics["gfn_loss"].append(gfn.item())
            self._gfn_metrics["log_reward_positive"].append(log_r[:, 0].mean().item())
            if K > 1:
                self._gfn_metrics["log_reward_augmented"].append(log_r[:, 1:].mean().item())
                self._gfn_metrics["r_sim_augmented"].append(parts["r_sim"][:, 1:].mean().item())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._gfn_metrics:
            prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
            logs.update({prefix + k: float(np.mean(v)) for k, v in self._gfn_metrics.items() if v})
            self._gfn_metrics.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict=None):
        # A clean HF CausalLM directory from the parent (heads are not model parameters), plus the GFlowGR files.
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        torch.save({k: v.detach().cpu() for k, v in self.gfn_modules.state_dict().items()}, out / HEADS_FILE)
        self.semantic_ids.save(out)
        self.tree.save(out / TREE_FILE)
        keys = (
            "gfn_loss",
            "gfn_lambda",
            "log_z",
            "detach_head_inputs",
            "num_augmented",
            "sampling_strategy",
            "curriculum_window",
            "reward_positive",
            "reward_logged",
            "reward_unobserved",
            "score_source",
            "reward_fusion",
            "reward_epsilon",
            "reward_similarity",
        )
        info = {
            "format": "trl-flower-gflowgr/1",
            "heads_file": HEADS_FILE,
            "tree_file": TREE_FILE,
            "terminator_id": self.terminator_id,
            **{k: getattr(self.args, k) for k in keys},
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
