"""State granularity (the paper's RQ4): `chunk_path_states` against a plain loop, n = 1 equal to the token-level
losses, n beyond every title a single segment, NaN padding that never leaks, the config checks and the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from trl_flower.losses import chunk_path_states, detailed_balance_loss, flower_subtb_loss


def random_paths(seed: int = 0, B: int = 5, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 4, 7, 6][:B])  # an empty title, a one-token title, and the full width T
    log_pf = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_pterm = -torch.rand(B, T + 1, generator=g, dtype=torch.float64) * 5
    log_reward = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_term = torch.full((B, T + 1), -15.0, dtype=torch.float64)
    log_term[torch.arange(B), lengths] = -torch.rand(B, generator=g, dtype=torch.float64)
    return log_pf, log_pterm, log_reward, log_term, lengths


def plain_chunked_subtb(log_pf, log_pterm, log_reward, log_term, lengths, n, lam=1.0) -> float:
    """The SubTB of reference §1.4 over the chunk states s_0, s_n, s_2n, …, s_t, written as plain loops."""
    num, den = 0.0, 0.0
    for b in range(log_pf.shape[0]):
        t = int(lengths[b])
        states = list(range(0, t, n)) + [t] if t > 0 else [0]
        for a in range(len(states)):
            for c in range(a + 1, len(states)):
                i, j = states[a], states[c]
                res = sum(float(log_pf[b, k] - log_reward[b, k]) for k in range(i, j))
                res += float(log_pterm[b, j] - log_term[b, j]) - float(log_pterm[b, i] - log_term[b, i])
                w = lam ** (c - a - 1)
                num += w * res * res
                den += w
    return num / max(den, 1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 150])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_chunked_subtb_matches_plain_loop(n, lam):
    inputs = random_paths()
    got = flower_subtb_loss(*chunk_path_states(*inputs, n=n), subtb_lambda=lam)
    assert got.item() == pytest.approx(plain_chunked_subtb(*inputs, n=n, lam=lam), rel=1e-12)


def test_chunked_db_matches_plain_loop():
    log_pf, log_pterm, log_reward, log_term, lengths = random_paths(seed=1)
    n = 3
    terms = []
    for b in range(log_pf.shape[0]):
        t = int(lengths[b])
        states = list(range(0, t, n)) + [t] if t > 0 else [0]
        for a in range(len(states) - 1):  # one residual per chunk transition
            i, j = states[a], states[a + 1]
            terms.append(sum(float(log_pf[b, k] - log_reward[b, k]) for k in range(i, j)))
        terms.append(float(log_pterm[b, t] - log_term[b, t]))  # and the termination at s_t
    expected = sum(r * r for r in terms) / len(terms)
    got = detailed_balance_loss(*chunk_path_states(log_pf, log_pterm, log_reward, log_term, lengths, n=n))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_granularity_one_is_the_token_level_loss_values_and_gradients():
    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in random_paths(seed=2)]
    a = flower_subtb_loss(*chunk_path_states(*inputs, n=1))
    grads_a = torch.autograd.grad(a, [inputs[0], inputs[1]])
    b = flower_subtb_loss(*inputs)
    grads_b = torch.autograd.grad(b, [inputs[0], inputs[1]])
    assert a.item() == b.item()
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_granularity_beyond_every_title_is_one_segment():
    log_pf, log_pterm, log_reward, log_term, lengths = random_paths(seed=3)
    pf, pterm, r, term, c = chunk_path_states(log_pf, log_pterm, log_reward, log_term, lengths, n=150)
    assert c.tolist() == [0, 1, 1, 1, 1]  # every non-empty title is one chunk
    per_sample = flower_subtb_loss(pf, pterm, r, term, c, reduction="none")
    for b in range(1, 5):
        t = int(lengths[b])
        res = (log_pf[b, :t] - log_reward[b, :t]).sum() + (log_pterm[b, t] - log_term[b, t])
        res = res - (log_pterm[b, 0] - log_term[b, 0])
        assert per_sample[b].item() == pytest.approx(res.item() ** 2, rel=1e-12)


def test_padding_never_leaks_into_chunks():
    log_pf, log_pterm, log_reward, log_term, lengths = random_paths(seed=4)
    k = torch.arange(log_pf.shape[1])
    pad = k.unsqueeze(0) >= lengths.unsqueeze(1)
    log_pf = torch.where(pad, float("nan"), log_pf).requires_grad_()
    log_reward = torch.where(pad, float("inf"), log_reward)
    loss = flower_subtb_loss(*chunk_path_states(log_pf, log_pterm, log_reward, log_term, lengths, n=3))
    (grad,) = torch.autograd.grad(loss, log_pf)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    assert (grad[pad] == 0).all()


@pytest.mark.parametrize("n", [0, -2, 1.5, True])
def test_chunk_rejects_bad_n(n):
    with pytest.raises(ValueError, match="tokens per state"):
        chunk_path_states(*random_paths(), n=n)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(state_granularity=0), "state_granularity=0"),
        (dict(state_granularity=2, flow_loss="full_distribution"), "full_distribution"),
    ],
)
def test_config_checks_state_granularity(tmp_path, kwargs, match):
    from trl_flower import FlowerConfig

    with pytest.raises(ValueError, match=match):
        FlowerConfig(output_dir=str(tmp_path), **kwargs)
