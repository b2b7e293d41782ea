r"""Flow-balance losses for GFlowNet fine-tuning of LLM recommenders on a prefix tree (Flower, arXiv 2503.07377).

Pure tensor functions: this module imports only torch, so trainers, scripts and tests can share it.

Setting (paper Eq. 1–12). A title y = (y_1 … y_t) is generated token by token from the prompt x; the states are
the prefixes s_k = (x, y_≤k), k = 0 … t, and the terminator ⊤ (a separate token) ends the title at s_t. The LLM is the
forward policy π(a | s); on a prefix tree every state has one parent, so P_B = 1. F(s) is the state flow (Eq. 8):
F(s) = Σ_{titles y with prefix s} R(y), so F(s_0) = Z. The process reward of a token is r(a | s) = F(s·a) / F(s)
(Eq. 10); the termination reward is r(⊤ | s_t) = R(y) / F(s_t). Personalised variants replace r by r̃ (§3.3.3).

Objectives (per sampled title, t = t_b title tokens, ℓ_k = log r̃(y_{k+1} | s_k), ρ_k = the termination target):

* SubTB with termination terms, the "modified SubTB" of the official code (Eq. 9/11 plus termination terms)::

      Res(i, j) = Σ_{k=i}^{j-1} [log π(y_{k+1} | s_k) − ℓ_k] + [log π(⊤ | s_j) − log ρ_j] − [log π(⊤ | s_i) − log ρ_i]
      L_SubTB   = Σ_{0≤i<j≤t} λ^{j−i−1} Res(i, j)² / Σ_{0≤i<j≤t} λ^{j−i−1}      (pooled over the micro-batch)

* Detailed balance (DB, length-1 segments of Eq. 11, "process supervision"), one residual per transition::

      (log π(y_{k+1} | s_k) − ℓ_k)² for k < t,   and   (log π(⊤ | s_t) − log ρ_t)² for the termination.

* Trajectory balance (TB, Eq. 5 on the whole trajectory)::

      (log Z + Σ_{k<t} log π(y_{k+1} | s_k) + log π(⊤ | s_t) − log R(y))²

* Full-distribution (KL) variant, on every visited state s with children c (⊤ included when s is a complete title)::

      KL(r(·|s) ‖ π(·|s)) = Σ_c r(c|s) (log r(c|s) − log π(c|s))

* SFT (Eq. 1) as the Hugging Face causal-LM loss, and the mix of Eq. 12: L = (1 − λ) L_SFT + λ L_flow.

Contract shared by every flow loss here: the value is ≥ 0 and it is exactly 0, with zero gradient, at balance (policy
equal to the targets; for the KL variant the gradient is zero w.r.t. the logits). Padding beyond a sample's length
never influences the value or the gradient: it is removed with `torch.where` before any arithmetic, so NaN or ±inf
padding is safe.

Tensor conventions: B = batch, T = max number of title tokens in the batch (⊤ excluded), `lengths` [B] = t_b,
S = T + 1 states, K = padded number of children, V = vocabulary size.

Note:
    Where this module departs from the official code (`modified_subtb_loss` in `with_history/code/utils_logp_*.py`):

    * The termination targets log ρ are an input. The official code hard-codes −15 (ρ = e^−15) at every prefix
      k < t_b, including prefixes that are themselves complete titles; the caller decides (see `docs/losses.md`).
    * The official loss takes `log_pf` with a 0 at the step that samples ⊤; here `log_pf` holds title tokens only and
      ⊤ enters through `log_pterm`. Both give the same Res(i, j) (checked in the reference notes, §1.4).
    * λ_sub is exposed (the official runs always use λ_sub = 1, a plain mean over valid pairs) and any λ ≥ 0 works;
      the weighting λ^{j−i−1} normalised by its sum is the official one. `reduction="none"` (per-sample means) is ours.
    * One vectorised [B, T+1, T+1] pairwise difference replaces the official Python loop over segment lengths.
"""

from __future__ import annotations

import torch

__all__ = [
    "chunk_path_states",
    "combine_losses",
    "detailed_balance_loss",
    "flow_log_probs",
    "flower_subtb_loss",
    "flower_tb_loss",
    "full_distribution_loss",
    "sft_loss",
    "token_log_probs",
    "trajectory_balance_loss",
    "tree_log_mass",
    "tree_normalized_flow_log_probs",
]


def _check_flow_inputs(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    log_term_target: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[int, int]:
    """Validate the shared [B, T] / [B, T+1] / [B] contract and return (B, T)."""
    if log_pf.ndim != 2:
        raise ValueError(f"`log_pf` must be [B, T] (one log-prob per title token), got shape {tuple(log_pf.shape)}.")
    B, T = log_pf.shape
    if log_reward.shape != (B, T):
        raise ValueError(
            f"`log_reward` must have the shape of `log_pf` {(B, T)} (one log process reward per title token), "
            f"got {tuple(log_reward.shape)}."
        )
    for name, x in (("log_pterm", log_pterm), ("log_term_target", log_term_target)):
        if x.shape != (B, T + 1):
            raise ValueError(
                f"`{name}` must be [B, T+1] = {(B, T + 1)} (one value per state s_0..s_T), got {tuple(x.shape)}; "
                "it has one more column than `log_pf` because the terminator can be taken after the last token."
            )
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"`lengths` must be an integer tensor of shape {(B,)} (number of title tokens per sample), "
            f"got shape {tuple(lengths.shape)} and dtype {lengths.dtype}."
        )
    # One host sync; a silent wrong mask would be worse (a length > T would count padding as title tokens).
    if B > 0 and bool(((lengths < 0) | (lengths > T)).any()):
        raise ValueError(
            f"`lengths` must lie in [0, T] = [0, {T}] (T = log_pf.shape[1]); got min {int(lengths.min())}, "
            f"max {int(lengths.max())}. Pad `log_pf` to the longest title in the batch."
        )
    return B, T


def _masks(lengths: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Title-token mask [B, T] (k < t_b) and state mask [B, T+1] (k ≤ t_b)."""
    k = torch.arange(T + 1, device=lengths.device)  # [T+1]
    state_mask = k[None, :] <= lengths[:, None]  # [B, T+1]
    title_mask = state_mask[:, 1:]  # [B, T]: token k is valid iff k + 1 ≤ t_b
    return title_mask, state_mask


def flower_subtb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    log_term_target: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Sub-trajectory balance with termination terms on a prefix tree (Flower's "modified SubTB", reference §1.4).

    For every sample b and every segment 0 ≤ i < j ≤ t_b::

        Res(i, j) = Σ_{k=i}^{j-1} [log_pf[k] − log_reward[k]] + [log_pterm[j] − log_term_target[j]]
                    − [log_pterm[i] − log_term_target[i]]
        loss = Σ_{valid (b,i,j)} λ^{j−i−1} Res(i, j)² / Σ_{valid (b,i,j)} λ^{j−i−1}

    With λ = 1 this is the plain mean over all t_b (t_b + 1) / 2 segments of every sample, pooled over the
    micro-batch (long titles have more segments and so weigh more), exactly the official loss. λ → 0 keeps only
    length-1 segments; λ → ∞ favours the longest segments (TB-like).

    Args:
        log_pf: [B, T] log π(y_{k+1} | s_k) of the sampled title token k (k < t_b).
        log_pterm: [B, T+1] log π(⊤ | s_k), the policy's log-prob of the terminator at state k (k ≤ t_b).
        log_reward: [B, T] ℓ_k = log r̃(y_{k+1} | s_k), the (personalised) log process reward of token k.
        log_term_target: [B, T+1] log ρ(s_k), the termination target (official: −15 for k < t_b and
            log R(y)/F(s_{t_b}) at k = t_b, possibly personalised).
        lengths: [B] integer t_b ∈ [0, T], the number of title tokens; ⊤ is action number t_b.
        subtb_lambda: λ ≥ 0, geometric weight of a segment by its length minus one.
        reduction: "mean" (weighted mean over all valid (b, i, j)), or "none" for the per-sample weighted mean [B]
            (0 for t_b = 0). The mean of the "none" output is *not* the "mean" output unless all t_b are equal.

    Returns:
        A scalar (or [B]) ≥ 0, zero iff every residual is zero, i.e. log π(⊤|s_k) − log ρ_k + Σ_{m<k}
        (log π − ℓ)_m is the same for all states of each path. Without any valid segment (all t_b = 0) the result
        is a zero that stays connected to the inputs' graph. Values beyond `lengths` never matter.
        Zero loss pins π(c|s) = F(c)/F(s) only if the policy puts no mass outside the tree's actions and the
        termination targets agree at titles that are prefixes of other titles (see `docs/losses.md`).

    Example:
        >>> import torch
        >>> loss = flower_subtb_loss(
        ...     log_pf=torch.tensor([[-1.0, -2.0]]), log_pterm=torch.tensor([[-3.0, -4.0, -0.5]]),
        ...     log_reward=torch.tensor([[-1.5, -1.0]]), log_term_target=torch.tensor([[-3.0, -3.0, -1.0]]),
        ...     lengths=torch.tensor([2]))
        >>> round(loss.item(), 4)  # residuals (0,1) = -0.5, (0,2) = 0, (1,2) = 0.5 -> (0.25 + 0 + 0.25) / 3
        0.1667
    """
    B, T = _check_flow_inputs(log_pf, log_pterm, log_reward, log_term_target, lengths)
    if not 0.0 <= subtb_lambda < float("inf"):  # also rejects NaN
        raise ValueError(f"`subtb_lambda` must be finite and >= 0 (1 = the official plain mean), got {subtb_lambda}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    title_mask, state_mask = _masks(lengths, T)  # [B, T], [B, T+1]

    # δ_k = log π(y_{k+1}|s_k) − ℓ_k on title tokens; padding becomes 0 *before* the cumulative sum.
    delta = torch.where(title_mask, log_pf - log_reward, 0.0)  # [B, T]
    # C_m = Σ_{k<m} δ_k with a leading 0, so Σ_{k=i}^{j-1} δ_k = C_j − C_i.
    cum = torch.cat([delta.new_zeros(B, 1), delta.cumsum(dim=1)], dim=1)  # [B, T+1]
    # g_m = log π(⊤|s_m) − log ρ_m, the termination term of state m.
    g = torch.where(state_mask, log_pterm - log_term_target, 0.0)  # [B, T+1]
    # Res(i, j) = P_j − P_i with the "potential" P_m = C_m + g_m.
    potential = cum + g  # [B, T+1]
    res = potential[:, None, :] - potential[:, :, None]  # [B, T+1 (i), T+1 (j)]

    idx = torch.arange(T + 1, device=log_pf.device)  # [T+1]
    i, j = idx[:, None], idx[None, :]  # [T+1, 1], [1, T+1]
    valid = (i < j)[None] & (j[None] <= lengths[:, None, None])  # [B, T+1, T+1]: 0 ≤ i < j ≤ t_b
    # Zero the residual (not just its weight) so that ±inf/NaN in invalid pairs cannot leak into the gradient.
    res = torch.where(valid, res, 0.0)  # [B, T+1, T+1]
    seg_weight = subtb_lambda ** (j - i - 1).clamp(min=0).to(res.dtype)  # [T+1, T+1]: λ^{j−i−1}
    weight = torch.where(valid, seg_weight, 0.0)  # [B, T+1, T+1]

    num = (weight * res.pow(2)).sum(dim=(1, 2))  # [B]
    den = weight.sum(dim=(1, 2))  # [B]
    # Every sample with t_b ≥ 1 has a length-1 segment of weight λ^0 = 1, so den is 0 or ≥ 1: clamping at 1 only
    # turns 0/0 into 0 (and keeps the graph) for samples or batches without segments.
    if reduction == "none":
        return num / den.clamp(min=1.0)  # [B]
    return num.sum() / den.sum().clamp(min=1.0)


def chunk_path_states(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    log_term_target: torch.Tensor,
    lengths: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Coarsen sampled paths to one GFlowNet state every `n` tokens (state granularity, the paper's RQ4, §1.7).

    The states of a path with t = t_b title tokens become the chunk boundaries s_0, s_n, s_2n, …, s_t (the last
    chunk may be shorter); C_b = ⌈t_b / n⌉ chunks. A chunk's forward log-probability and its log reward are the sums
    over its tokens; the termination terms are read at the chunk starts and at s_t::

        log_pf'[c]    = Σ_{k = cn}^{min((c+1)n, t) − 1} log_pf[k]          c < C_b
        log_reward'[c] = Σ_{same k} log_reward[k]
        log_pterm'[c] = log_pterm[min(cn, t)],  log_term_target'[c] = log_term_target[min(cn, t)]   c ≤ C_b

    The result has the same contract as the inputs (C = ⌈T / n⌉ columns), so any path loss of this module
    (:func:`flower_subtb_loss`, :func:`detailed_balance_loss`, :func:`flower_tb_loss`) runs on it unchanged.
    n = 1 returns the same path; n ≥ every t_b leaves the single segment (s_0, s_t): SubTB then equals TB with the
    termination term at s_0 in place of log Z. An invalid token's −15 adds up to −15 · (tokens of its chunk), as in
    the official `utils_logp_n.py`; termination targets are taken as given (−15 stays −15).

    Args:
        log_pf, log_pterm, log_reward, log_term_target, lengths: as in :func:`flower_subtb_loss`.
        n: tokens per state, >= 1.

    Returns:
        (log_pf [B, C], log_pterm [B, C+1], log_reward [B, C], log_term_target [B, C+1], lengths [B] = ⌈t_b / n⌉).

    Example:
        >>> pf, pterm, r, term, c = chunk_path_states(
        ...     torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-9.0, -8.0, -7.0, -0.5]]),
        ...     torch.tensor([[-0.5, -0.5, -1.0]]), torch.tensor([[-15.0, -15.0, -15.0, -2.0]]), torch.tensor([3]), n=2)
        >>> pf.tolist(), pterm.tolist(), r.tolist(), c.tolist()  # chunks [0, 1] and [2]; states s_0, s_2, s_3
        ([[-3.0, -3.0]], [[-9.0, -7.0, -0.5]], [[-1.0, -1.0]], [2])
    """
    B, T = _check_flow_inputs(log_pf, log_pterm, log_reward, log_term_target, lengths)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` (tokens per state) must be an integer >= 1, got {n!r}.")
    if n == 1:
        return log_pf, log_pterm, log_reward, log_term_target, lengths
    title_mask, _ = _masks(lengths, T)  # [B, T]
    C = -(-T // n)  # ⌈T / n⌉
    chunk = torch.arange(T, device=log_pf.device) // n  # [T] chunk of each token
    # padding becomes 0 *before* the sums, so NaN/inf beyond a row's length cannot leak in
    pf = log_pf.new_zeros(B, C).index_add(1, chunk, torch.where(title_mask, log_pf, 0.0))  # [B, C]
    reward = log_reward.new_zeros(B, C).index_add(1, chunk, torch.where(title_mask, log_reward, 0.0))  # [B, C]
    boundary = torch.arange(C + 1, device=log_pf.device) * n  # [C+1] token index of chunk start c
    state = torch.minimum(boundary.unsqueeze(0), lengths.unsqueeze(1))  # [B, C+1]: s_{cn}, the last one s_t
    pterm = log_pterm.gather(1, state)  # [B, C+1]
    term_target = log_term_target.gather(1, state)  # [B, C+1]
    return pf, pterm, reward, term_target, (lengths + n - 1) // n


def detailed_balance_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    log_term_target: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    r"""Detailed balance on each sampled transition with exact tree flows (P_B = 1; Eq. 11 with length-1 segments).

    With F(s_{k+1}) / F(s_k) = r(y_{k+1} | s_k) the DB condition F(s_k) π(a|s_k) = F(s·a) becomes log π = log r::

        loss = [Σ_b Σ_{k<t_b} (log_pf[k] − log_reward[k])² + Σ_b (log_pterm[t_b] − log_term_target[t_b])²]
               / Σ_b (t_b + 1)

    i.e. a mean over all t_b title transitions plus the one termination transition of every sample. Intermediate
    termination log-probs (k < t_b) are not used.

    Args:
        log_pf, log_pterm, log_reward, log_term_target, lengths: as in `flower_subtb_loss`.

    Returns:
        A scalar ≥ 0; zero iff π equals the process reward on every sampled token and the termination target at t_b.

    Example:
        >>> import torch
        >>> loss = detailed_balance_loss(
        ...     log_pf=torch.tensor([[-1.0, -2.0]]), log_pterm=torch.tensor([[-3.0, -4.0, -0.5]]),
        ...     log_reward=torch.tensor([[-1.5, -1.0]]), log_term_target=torch.tensor([[-3.0, -3.0, -1.0]]),
        ...     lengths=torch.tensor([2]))
        >>> round(loss.item(), 4)  # (0.5² + 1² + 0.5²) / 3
        0.5
    """
    B, T = _check_flow_inputs(log_pf, log_pterm, log_reward, log_term_target, lengths)
    title_mask, _ = _masks(lengths, T)  # [B, T]
    token_res = torch.where(title_mask, log_pf - log_reward, 0.0)  # [B, T]
    # gather only reads position t_b, so its backward sends nothing to padded positions.
    term_res = (log_pterm - log_term_target).gather(1, lengths[:, None].long()).squeeze(1)  # [B]
    n_transitions = (lengths.sum() + B).clamp(min=1).to(token_res.dtype)  # Σ_b (t_b + 1)
    return (token_res.pow(2).sum() + term_res.pow(2).sum()) / n_transitions


def trajectory_balance_loss(
    log_pf_sum: torch.Tensor,
    log_reward: torch.Tensor,
    log_z: torch.Tensor | float,
) -> torch.Tensor:
    r"""Generic trajectory balance: mean over trajectories of (log Z + log P_F(τ) − log R(x))² (P_B = 1).

    Args:
        log_pf_sum: [B] log P_F(τ), the sum of the policy's log-probs along each trajectory (terminator included).
        log_reward: [B] log R of each trajectory's object.
        log_z: log Z: a float or a 0-d tensor (known, e.g. Flower's log F(root), or a learned parameter), or a
            [B] tensor (e.g. a per-prompt head, as in GFlowGR). Gradients flow into it when it requires grad.

    Returns:
        A scalar ≥ 0; zero iff P_F(τ) = R / Z for every trajectory.

    Example:
        >>> import torch
        >>> trajectory_balance_loss(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0]), log_z=1.0).item()
        0.5
    """
    if log_pf_sum.ndim != 1 or log_reward.shape != log_pf_sum.shape:
        raise ValueError(
            f"`log_pf_sum` and `log_reward` must both be [B], got {tuple(log_pf_sum.shape)} and "
            f"{tuple(log_reward.shape)}; sum per-token log-probs over the trajectory first."
        )
    if torch.is_tensor(log_z) and log_z.shape not in ((), log_pf_sum.shape):
        raise ValueError(f"`log_z` must be a scalar or [B] = {tuple(log_pf_sum.shape)}, got {tuple(log_z.shape)}.")
    res = log_z + log_pf_sum - log_reward  # [B]
    return res.pow(2).sum() / max(res.shape[0], 1)


def flower_tb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    log_term_target: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    r"""Trajectory balance on the prefix tree from the same inputs as `flower_subtb_loss`.

    Builds log P_F(τ) = Σ_{k<t_b} log_pf[k] + log_pterm[t_b] and the target
    log R(y)/Z = Σ_{k<t_b} log_reward[k] + log_term_target[t_b] (the process rewards telescope), then returns
    the mean over the batch of (log P_F(τ) − log R/Z)², i.e. `trajectory_balance_loss` with log Z folded into the
    target. The residual equals Res(0, t_b) of `flower_subtb_loss` plus log_pterm[0] − log_term_target[0].

    Args:
        log_pf, log_pterm, log_reward, log_term_target, lengths: as in `flower_subtb_loss`.

    Returns:
        A scalar ≥ 0; zero iff every sampled title has P_F(τ) equal to its target probability.
    """
    B, T = _check_flow_inputs(log_pf, log_pterm, log_reward, log_term_target, lengths)
    title_mask, _ = _masks(lengths, T)  # [B, T]
    last = lengths[:, None].long()  # [B, 1], index of the terminating state s_{t_b}
    log_pf_traj = torch.where(title_mask, log_pf, 0.0).sum(1) + log_pterm.gather(1, last).squeeze(1)  # [B]
    log_target = torch.where(title_mask, log_reward, 0.0).sum(1) + log_term_target.gather(1, last).squeeze(1)  # [B]
    return trajectory_balance_loss(log_pf_traj, log_target, log_z=0.0)


def full_distribution_loss(
    child_log_probs: torch.Tensor,
    child_log_rewards: torch.Tensor,
    child_mask: torch.Tensor,
    state_mask: torch.Tensor,
) -> torch.Tensor:
    r"""Full-distribution variant: mean over visited states of KL(r(·|s) ‖ π(·|s)) over the state's children.

    For each valid state s (children c, with ⊤ among them when s is a complete title)::

        KL_s = Σ_c r_c (log r_c − log π_c),   loss = Σ_{valid s} KL_s / #valid states

    `child_log_probs` must be the policy's *full-vocabulary* log-probs gathered at the children (so Σ_c π_c ≤ 1)
    and `child_log_rewards` must be normalised over the children (Σ_c r_c = 1); then KL_s ≥ −log Σ_c π_c ≥ 0,
    with equality iff π_c = r_c on every child. Zero-flow children (log r_c = −inf) contribute exactly 0 and no
    NaN gradient. At balance the gradient is zero w.r.t. the logits (through the log-softmax), not w.r.t.
    `child_log_probs` themselves (∂KL/∂log π_c = −r_c), which are not free parameters.

    Args:
        child_log_probs: [B, S, K] log π(c | s) over the full vocabulary, gathered at the children's tokens.
        child_log_rewards: [B, S, K] log r(c | s), log-normalised over the node's children; −inf allowed.
        child_mask: [B, S, K] bool, True for real children.
        state_mask: [B, S] bool, True for visited states (S = T + 1 for a path s_0..s_T).

    Returns:
        A scalar ≥ 0 (0 without valid states, connected to the graph).

    Example:
        >>> import math, torch
        >>> loss = full_distribution_loss(
        ...     torch.tensor([[[math.log(0.25), math.log(0.5)]]]), torch.tensor([[[math.log(0.5), math.log(0.5)]]]),
        ...     torch.tensor([[[True, True]]]), torch.tensor([[True]]))
        >>> round(loss.item(), 4)  # 0.5 * ln(0.5 / 0.25)
        0.3466
    """
    if child_log_probs.ndim != 3 or child_log_rewards.shape != child_log_probs.shape:
        raise ValueError(
            f"`child_log_probs` and `child_log_rewards` must both be [B, S, K], got {tuple(child_log_probs.shape)} "
            f"and {tuple(child_log_rewards.shape)}."
        )
    if child_mask.shape != child_log_probs.shape or child_mask.dtype != torch.bool:
        raise ValueError(f"`child_mask` must be a bool [B, S, K] = {tuple(child_log_probs.shape)} tensor.")
    if state_mask.shape != child_log_probs.shape[:2] or state_mask.dtype != torch.bool:
        raise ValueError(f"`state_mask` must be a bool [B, S] = {tuple(child_log_probs.shape[:2])} tensor.")
    # r_c = 0 contributes 0 (0·log 0 = 0); drop those children and the padding before any arithmetic.
    keep = child_mask & state_mask[..., None] & (child_log_rewards > float("-inf"))  # [B, S, K]
    log_r = torch.where(keep, child_log_rewards, 0.0)  # [B, S, K]
    log_pi = torch.where(keep, child_log_probs, 0.0)  # [B, S, K]
    kl_terms = torch.where(keep, log_r.exp() * (log_r - log_pi), 0.0)  # [B, S, K]
    kl = kl_terms.sum(dim=-1)  # [B, S]
    n_states = state_mask.sum().clamp(min=1).to(kl.dtype)
    return kl.sum() / n_states


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    r"""Supervised fine-tuning loss (Eq. 1): token-mean cross-entropy over the label positions of the micro-batch.

    Hugging Face causal-LM convention: logits[:, p] predicts labels[:, p + 1]; positions labelled `ignore_index`
    (prompt, padding) are skipped::

        loss = − Σ_{p: labels[p+1] ≠ ignore} log softmax(logits[p])[labels[p+1]] / #{p: labels[p+1] ≠ ignore}

    The value equals `model(input_ids, labels=labels).loss` of a transformers causal LM (logits are upcast to
    float32 as there). Without any label position it returns 0 (transformers returns NaN).

    Args:
        logits: [B, L, V] next-token logits.
        labels: [B, L] token ids, `ignore_index` where no loss is taken.
        ignore_index: label value to skip.

    Returns:
        A scalar ≥ 0; zero iff the model puts probability 1 on every label token.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`logits` must be [B, L, V] and `labels` [B, L]; got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision → float32, as HF does
    shift_logits = logits[:, :-1]  # [B, L-1, V]
    shift_labels = labels[:, 1:]  # [B, L-1]
    ce_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    n_tokens = (shift_labels != ignore_index).sum().clamp(min=1).to(ce_sum.dtype)
    return ce_sum / n_tokens


def combine_losses(sft: torch.Tensor, flow: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Flower's objective (Eq. 12): (1 − λ) · L_SFT + λ · L_flow.

    Args:
        sft: scalar SFT loss.
        flow: scalar flow loss (e.g. `flower_subtb_loss`).
        lam: λ ∈ [0, 1]. The official scripts use λ = 1 − `train_theta`, e.g. 0.005 (CDs, Movies), 0.0005 (Games).

    Example:
        >>> import torch
        >>> combine_losses(torch.tensor(2.0), torch.tensor(10.0), lam=0.25).item()
        4.0
    """
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(
            f"`lam` (the flow-loss weight λ of Eq. 12) must be in [0, 1], got {lam}; λ = 1 − train_theta of the "
            "official scripts, e.g. 0.005."
        )
    return (1.0 - lam) * sft + lam * flow


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    r"""Full-vocabulary log-probabilities log softmax(logits)[token] gathered at `token_ids`.

    Computed as logits[token] − logsumexp(logits) so the [..., V] log-softmax is never stored. Half-precision
    logits are upcast to float32 first.

    Args:
        logits: [..., V] logits (or log-probs: the result is the same).
        token_ids: [..., K] token ids with the same leading dims. Negative ids (padding) are read as id 0, so their
            outputs are arbitrary finite values that the losses above mask out.

    Returns:
        [..., K] log-probabilities.
    """
    if token_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"`token_ids` {tuple(token_ids.shape)} must share the leading dims of `logits` {tuple(logits.shape)}."
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    safe_ids = torch.where(token_ids >= 0, token_ids, 0).long()  # [..., K]
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # [..., 1]
    return logits.gather(-1, safe_ids) - log_z  # [..., K]


def flow_log_probs(
    state_logits: torch.Tensor, title_ids: torch.Tensor, terminator_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`log_pf` [B, T] and `log_pterm` [B, T+1] for `flower_subtb_loss` from a teacher-forced forward pass.

    `state_logits[:, k]` must be the logits at state s_k, i.e. the position whose next token is title token k (or
    ⊤). For left-padded prompts of common length P followed by the title, that is `logits[:, P - 1 : P + T]`.

    Args:
        state_logits: [B, T+1, V] logits at the states s_0..s_T.
        title_ids: [B, T] sampled title tokens (any padding beyond the length; negative ids allowed).
        terminator_id: the token id of ⊤.

    Returns:
        (log_pf, log_pterm): [B, T] log π(y_{k+1} | s_k) and [B, T+1] log π(⊤ | s_k), full-vocabulary.
    """
    B, S, _ = state_logits.shape
    if title_ids.shape != (B, S - 1):
        raise ValueError(
            f"`title_ids` must be [B, T] = {(B, S - 1)} for `state_logits` [B, T+1, V] = {tuple(state_logits.shape)}."
        )
    # One gather per state: column 0 = the sampled title token (⊤ at the last state, unused), column 1 = ⊤.
    term_col = torch.full((B, S, 1), terminator_id, dtype=torch.long, device=title_ids.device)  # [B, T+1, 1]
    title_col = torch.cat([title_ids.long(), term_col[:, -1]], dim=1)[..., None]  # [B, T+1, 1]
    both = token_log_probs(state_logits, torch.cat([title_col, term_col], dim=-1))  # [B, T+1, 2]
    log_pf = both[:, :-1, 0]  # [B, T]
    log_pterm = both[:, :, 1]  # [B, T+1]
    return log_pf, log_pterm


def tree_log_mass(child_log_probs: torch.Tensor, child_mask: torch.Tensor) -> torch.Tensor:
    r"""log Σ_{c ∈ children(s)} π(c | s) per state: the policy's log-mass on the tree's actions; [B, S].

    Args:
        child_log_probs: [B, S, K] full-vocabulary log π(c | s) gathered at each state's children.
        child_mask: [B, S, K] bool, True for real children.

    Returns:
        [B, S]; 0 at states without children (padding), so that subtracting it there is a no-op with finite
        gradients.

    Example:
        >>> import math, torch
        >>> m = tree_log_mass(torch.log(torch.tensor([[[0.2, 0.3, 0.4]]])), torch.tensor([[[True, True, False]]]))
        >>> round(math.exp(m.item()), 4)
        0.5
    """
    if child_mask.shape != child_log_probs.shape or child_mask.dtype != torch.bool:
        raise ValueError(
            f"`child_mask` must be a bool tensor shaped like `child_log_probs` {tuple(child_log_probs.shape)}, got "
            f"{child_mask.dtype} {tuple(child_mask.shape)}."
        )
    has_children = child_mask.any(dim=-1)  # [B, S]
    masked = torch.where(child_mask, child_log_probs, float("-inf"))
    # A state without children would give logsumexp = −inf and a NaN gradient: give it 0 on a finite input instead.
    masked = torch.where(has_children.unsqueeze(-1), masked, 0.0)
    return torch.where(has_children, torch.logsumexp(masked, dim=-1), 0.0)


def tree_normalized_flow_log_probs(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_term_target: torch.Tensor,
    log_mass: torch.Tensor,
    term_allowed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`log_pf` and `log_pterm` of the policy renormalised over the tree's children, for the path losses.

    log π_tree(a | s) = log π(a | s) − log Σ_{c ∈ children(s)} π(c | s). Trie-constrained decoding samples and
    ranks with π_tree, so matching π_tree to the flow ratios F(c)/F(s) fits what the recommender actually outputs,
    and probability the model puts off the tree no longer enters the flow loss (the SFT loss still sees it).
    Where ⊤ is not a child of s_k, π_tree(⊤ | s_k) = 0 and the termination term has nothing to match: `log_pterm`
    is set to `log_term_target` there, so that state's term g_k = log π(⊤|s_k) − log ρ_k is exactly 0 (no gradient).

    Args:
        log_pf: [B, T] full-vocabulary log π(y_{k+1} | s_k) (`flow_log_probs`).
        log_pterm: [B, T+1] full-vocabulary log π(⊤ | s_k).
        log_term_target: [B, T+1] the termination targets log ρ_k.
        log_mass: [B, T+1] `tree_log_mass` of each state.
        term_allowed: [B, T+1] bool, True where ⊤ is among the children of s_k (s_k is a complete title).

    Returns:
        (log_pf, log_pterm) [B, T], [B, T+1] in the tree-normalised policy, for `flower_subtb_loss`,
        `detailed_balance_loss` or `flower_tb_loss`.
    """
    if log_mass.shape != log_pterm.shape or term_allowed.shape != log_pterm.shape:
        raise ValueError(
            f"`log_mass` and `term_allowed` must be [B, T+1] = {tuple(log_pterm.shape)}, got "
            f"{tuple(log_mass.shape)} and {tuple(term_allowed.shape)}."
        )
    tree_pf = log_pf - log_mass[:, :-1]
    tree_pterm = torch.where(term_allowed, log_pterm - log_mass, log_term_target.to(log_pterm.dtype))
    return tree_pf, tree_pterm
