r"""Detailed balance with a *learned* state-flow estimator (GFlowGR's DB; TB reuses `trl_flower.losses`).

Flower's `detailed_balance_loss` compares the policy with exact tree flows. GFlowGR instead learns log F(s) with a
head on the LM's hidden states and pins the terminal flow to the reward (P_B = 1 on the prefix tree)::

    L_DB(τ) = Σ_{l=0}^{T−1} ( log F(s_l) + log P_GR(t_{l+1} | U, s_l) − log F(s_{l+1}) )²,   F(s_T) := R(s_T),

where T counts every generated token of the item path (the L + 1 code tokens and the terminator). This module
imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["learned_flow_db_loss"]


def learned_flow_db_loss(log_flow: torch.Tensor, log_pf: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """Sum over transitions, mean over trajectories, of the DB residual² with learned flows.

    Args:
        log_flow: [B, T] log F(s_l) predicted at the states s_0 … s_{T−1} (the state that emits token l + 1).
        log_pf: [B, T] log P_GR(t_{l+1} | U, s_l) of the path tokens (all paths have the same length T).
        log_reward: [B] log R of the terminal state s_T.

    Returns:
        A scalar ≥ 0, zero iff every transition is balanced.

    Example:
        >>> lf = torch.tensor([[0.0, -1.0]]); lp = torch.tensor([[-1.0, -0.5]])
        >>> learned_flow_db_loss(lf, lp, torch.tensor([-1.5])).item()  # residuals 0 and 0
        0.0
    """
    if log_flow.ndim != 2 or log_pf.shape != log_flow.shape or log_reward.shape != log_flow.shape[:1]:
        raise ValueError(
            f"need log_flow and log_pf [B, T] and log_reward [B]; got {tuple(log_flow.shape)}, "
            f"{tuple(log_pf.shape)}, {tuple(log_reward.shape)}"
        )
    next_flow = torch.cat([log_flow[:, 1:], log_reward[:, None].to(log_flow.dtype)], dim=1)  # [B, T]: F(s_{l+1})
    res = log_flow + log_pf - next_flow  # [B, T]
    return res.pow(2).sum(1).mean()
