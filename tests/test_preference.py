"""DPO-family baselines (DPO, S-DPO, DMPO, RosePO; `trl_flower.baselines.preference`, flower_reference.md §4).

Loss functions and samplers are checked against hand-computed values; every method then trains 1 step of a 0.1 M
parameter Qwen2 on the 10-item conftest catalogue, from a Flower checkpoint (policy init = reference) and from an SFT
checkpoint with the Flower checkpoint as reference (the saved runs of `baseline_setup.py`). The online RL baselines
are tested in test_online_rl.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from baseline_setup import COUNTS, PROMPT, TINY, params

from trl_flower.baselines.preference import (
    MultiNegativeDPOTrainer,
    PreferenceDPOTrainer,
    build_preference_dataset,
    dmpo_loss,
    dpo_sigmoid_loss,
    make_preference_dataset,
    official_dpo_args,
    sample_popularity_negatives,
    sample_uniform_negatives,
    sdpo_loss,
    title_ids,
    train_preference,
)
from trl_flower.tree import PrefixTree

# ------------------------------------------------------------------------------------------------ losses


def test_sdpo_loss_three_negatives_hand_computed():
    beta = 0.3
    chosen = torch.tensor([0.5, -1.0])
    rejected = torch.tensor([[0.2, -0.3, 1.0], [-2.0, -1.5, 0.0]])
    got = sdpo_loss(chosen, rejected, beta)
    # L = -log σ(-log Σ_j exp(β (r_j - r_w)))
    for b in range(2):
        s = sum(math.exp(beta * (float(rejected[b, j]) - float(chosen[b]))) for j in range(3))
        x = -math.log(s)
        assert float(got[b]) == pytest.approx(-math.log(1 / (1 + math.exp(-x))), rel=1e-6)
    # row 0 by hand: exp(.3*-.3)+exp(.3*-.8)+exp(.3*.5) = 0.913931+0.786628+1.161834 = 2.862393; σ(-log s) = 1/(1+s)
    assert float(got[0]) == pytest.approx(math.log(1 + 2.862393), abs=1e-5)


def test_dmpo_loss_is_a_sum_over_negatives():
    beta = 0.3
    chosen = torch.tensor([0.5])
    rejected = torch.tensor([[0.2, -0.3, 1.0]])
    # L = -log σ(β Σ_j (r_w - r_j)) = -log σ(0.3 * (0.3 + 0.8 - 0.5)) = -log σ(0.18)
    assert float(dmpo_loss(chosen, rejected, beta)[0]) == pytest.approx(math.log(1 + math.exp(-0.18)), abs=1e-6)
    mean_version = math.log(1 + math.exp(-0.06))
    assert float(dmpo_loss(chosen, rejected, beta)[0]) != pytest.approx(mean_version, abs=1e-4)


def test_one_negative_sdpo_and_dmpo_equal_sigmoid_dpo():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, 1, generator=g)
    dpo = dpo_sigmoid_loss(chosen, rejected[:, 0], 0.3)
    assert torch.allclose(sdpo_loss(chosen, rejected, 0.3), dpo, atol=1e-6)
    assert torch.allclose(dmpo_loss(chosen, rejected, 0.3), dpo, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, J\]"):
        sdpo_loss(chosen, rejected[:, 0], 0.3)


# ------------------------------------------------------------------------------------------------ samplers


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=COUNTS)


def test_uniform_sampler_excludes_target_title_and_is_uniform(tree):
    titles = title_ids(tree)
    assert titles[3] == titles[4] and len(set(titles.tolist())) == 9  # "Blue Train" twice
    targets = np.array([3, 4, 0, 9] * 2500)
    neg = sample_uniform_negatives(targets, titles, 3, seed=1)
    assert neg.shape == (10000, 3)
    assert torch.equal(neg, sample_uniform_negatives(targets, titles, 3, seed=1))  # seeded
    t = torch.as_tensor(titles)
    assert not (t[neg] == t[torch.as_tensor(targets)].unsqueeze(1)).any()  # never the target's title
    assert (t[neg][:, 0] != t[neg][:, 1]).all() and (t[neg][:, 1] != t[neg][:, 2]).all()  # distinct titles
    first = neg[:, 0][torch.as_tensor(targets) == 0]  # target "Back to Life": 9 other ids, each 1/9
    freq = torch.bincount(first, minlength=10).double() / first.numel()
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.full((9,), 1 / 9, dtype=torch.float64), atol=0.03)


def test_popularity_sampler_proportions(tree):
    titles = title_ids(tree)
    counts = np.array([5, 0, 9, 3, 3, 7, 0, 4, 6, 8], dtype=float)
    targets = np.full(20000, 3)  # "Blue Train": ids 3 and 4 excluded
    neg = sample_popularity_negatives(targets, titles, counts, 1, seed=0)[:, 0]
    freq = torch.bincount(neg, minlength=10).double() / neg.numel()
    expected = counts.copy()
    expected[[3, 4]] = 0
    expected /= expected.sum()  # e.g. P(id 2) = 9 / 39
    assert freq[1] == 0 and freq[6] == 0 and freq[3] == 0 and freq[4] == 0
    assert np.allclose(freq.numpy(), expected, atol=0.01)
    with pytest.raises(ValueError, match="fewer than"):
        sample_popularity_negatives([0], titles, np.eye(10)[0] + np.eye(10)[1], 2, seed=0)


def test_preference_dataset_uses_item_token_paths(tree, tiny_tokenizer, tiny_titles):
    eos = tiny_tokenizer.eos_token_id
    prompts = [PROMPT.format(tiny_titles[0]), PROMPT.format(tiny_titles[5])]
    ds = build_preference_dataset(prompts, [2, 1], torch.tensor([[0, 5, 7], [9, 8, 3]]), tree, tiny_tokenizer)
    assert ds[0]["chosen_ids"] == tiny_tokenizer.encode(tiny_titles[2], add_special_tokens=False) + [eos]
    assert ds[1]["rejected_ids"][2] == tiny_tokenizer.encode("Blue Train", add_special_tokens=False) + [eos]
    assert ds[0]["prompt_ids"] == tiny_tokenizer(prompts[0])["input_ids"]
    single = build_preference_dataset(prompts, [2, 1], torch.tensor([[0], [9]]), tree, tiny_tokenizer)
    assert single[1]["rejected_ids"] == tiny_tokenizer.encode(tiny_titles[9], add_special_tokens=False) + [eos]


# ------------------------------------------------------------------------------------------------ trainers


@pytest.fixture(scope="module")
def ckpts(baseline_checkpoints):
    return baseline_checkpoints


@pytest.fixture(scope="module")
def rows(tiny_titles):
    from baseline_setup import preference_rows

    return preference_rows(tiny_titles)


def test_multi_negative_trainer_with_one_negative_matches_trl_dpo(ckpts, tree, tiny_tokenizer, rows, tmp_path):
    """Our _compute_loss with J = 1 (S-DPO and DMPO) equals TRL's own sigmoid DPO loss on the same batch."""
    from trl import DPOConfig

    from trl_flower.chain import load_reference_policy

    targets = np.asarray(rows["item_id"])
    neg = sample_uniform_negatives(targets, title_ids(tree), 1, seed=0)
    single = build_preference_dataset(rows["prompt"], targets, neg, tree, tiny_tokenizer, multi_negative=False)
    multi = build_preference_dataset(rows["prompt"], targets, neg, tree, tiny_tokenizer, multi_negative=True)
    args = lambda: DPOConfig(output_dir=str(tmp_path), beta=0.3, **TINY)  # noqa: E731
    common = dict(model=str(ckpts["sft"]), processing_class=tiny_tokenizer)
    trl_dpo = PreferenceDPOTrainer(
        ref_model=load_reference_policy(ckpts["flower"]), args=args(), train_dataset=single, **common
    )
    batch = trl_dpo.data_collator([single[i] for i in range(4)])
    expected = float(trl_dpo.compute_loss(trl_dpo.model, batch).detach())
    assert abs(expected - math.log(2)) > 1e-4  # policy != reference: a non-trivial value
    for loss in ("sdpo", "dmpo"):
        ours = MultiNegativeDPOTrainer(
            loss=loss, ref_model=load_reference_policy(ckpts["flower"]), args=args(), train_dataset=multi, **common
        )
        got = float(ours.compute_loss(ours.model, ours.data_collator([multi[i] for i in range(4)])).detach())
        assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("init", ["flower", "sft"])
@pytest.mark.parametrize("method", ["dpo", "sdpo", "dmpo", "rosepo"])
def test_train_preference(method, init, ckpts, rows, tmp_path):
    """Policy init = reference = Flower (first loss is the value at zero margins) or SFT init with Flower reference."""
    from transformers import AutoModelForCausalLM

    trainer = train_preference(method, ckpts[init], ckpts["flower"], rows, tmp_path, train=False, **TINY)
    before = params(trainer.model)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 1 and math.isfinite(losses[0])
    at_zero = math.log(4) if method == "sdpo" else math.log(2)  # −log σ(−log 3) = log 4; −log σ(0) = log 2
    if init == "flower":
        assert losses[0] == pytest.approx(at_zero, abs=1e-4)
    else:
        assert abs(losses[0] - at_zero) > 1e-4
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    flower = AutoModelForCausalLM.from_pretrained(ckpts["flower"])
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), flower.state_dict().values()))


def test_make_preference_dataset_rosepo_counts_histories(tree, tiny_tokenizer, rows):
    ds = make_preference_dataset("rosepo", rows, tree, tiny_tokenizer, seed=0)
    history_items = {i for h in rows["history_item_id"] for i in h}  # {0, 1, 2, 3, 4}
    t = title_ids(tree)
    for target, (neg,) in zip(ds["chosen_item_id"], ds["rejected_item_ids"]):
        assert neg in history_items and t[neg] != t[target]
    with pytest.raises(ValueError, match="method must be one of"):
        make_preference_dataset("ipo", rows, tree, tiny_tokenizer)


def test_official_dpo_args_use_trl_sigmoid_loss_for_dpo_and_rosepo_only():
    assert official_dpo_args("dpo")["loss_type"] == ["sigmoid"] == official_dpo_args("rosepo")["loss_type"]
    assert "loss_type" not in official_dpo_args("sdpo") and official_dpo_args("sdpo")["beta"] == 0.3
    with pytest.raises(ValueError, match="method must be one of"):
        official_dpo_args("ppo")
