"""BIGRec (SFT) and IFairLRS (`trl_flower.baselines.sft`): weights, loss and a few training steps on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trl_flower.baselines.sft import (
    IFairSFTTrainer,
    build_sft_dataset,
    ifair_group_weights,
    ifair_sample_weights,
    train_sft,
    weighted_response_nll,
)
from trl_flower.tree import PrefixTree


def test_ifair_weights_by_hand():
    # history counts a 3, b 2, c 1, d 1 -> G = 2 groups [a, b], [c, d]; q = [5/7, 2/7]
    histories = [["a", "b"], ["a", "c"], ["a", "b", "d"]]
    # targets a (group 0), c (group 1), e (in no history -> least popular group 1): t = [1/3, 2/3]
    weights, group_weights, groups = ifair_sample_weights(histories, ["a", "c", "e"], num_groups=2)
    q, t = np.array([5 / 7, 2 / 7]), np.array([1 / 3, 2 / 3])
    np.testing.assert_allclose(group_weights, q / t)  # w_g = q_g / t_g = [15/7, 3/7]
    np.testing.assert_allclose(weights, [15 / 7, 3 / 7, 3 / 7])
    assert groups.tolist() == [0, 1, 1]
    # a group without targets is unused and gets 0
    np.testing.assert_allclose(ifair_group_weights([0.6, 0.4], [0, 0]), [0.6, 0.0])


def reference_loss(logits, labels, weights):
    """Plain loops: mean_u w_u · (Σ_{t: labels[u, t+1] != -100} −log softmax(logits[u, t])[labels[u, t+1]]) / n_u."""
    total = 0.0
    for u in range(logits.shape[0]):
        ce, n = 0.0, 0
        for t in range(logits.shape[1] - 1):
            y = int(labels[u, t + 1])
            if y == -100:
                continue
            z = [float(v) for v in logits[u, t]]
            ce += -(z[y] - math.log(sum(math.exp(v) for v in z)))
            n += 1
        total += float(weights[u]) * ce / n
    return total / logits.shape[0]


def test_weighted_response_nll_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)  # [B, T, V]
    labels = torch.tensor(
        [
            [-100, -100, 1, 3, -100],  # row 0: prompt of 2, response of 2, one pad
            [-100, 2, 0, 1, 2],
        ]
    )  # row 1: prompt of 1, response of 4
    weights = torch.tensor([2.0, 0.5])
    expected = reference_loss(logits, labels, weights)
    assert weighted_response_nll(logits, labels, weights).item() == pytest.approx(expected, rel=1e-5)
    # normalised by the response length: more padding (or prompt) columns do not change it (the official code
    # divides by the padded length, which would)
    padded = torch.cat([logits, torch.randn(2, 3, 4)], dim=1)
    more = torch.cat([labels, torch.full((2, 3), -100)], dim=1)
    assert weighted_response_nll(padded, more, weights).item() == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer)


def rows(tiny_titles):
    """8 training rows: prompt text, target id, history titles."""
    out = []
    for i in range(8):
        history = [tiny_titles[(i + 1) % 10], tiny_titles[(3 * i) % 10]]
        prompt = f"The user has enjoyed the following items before: {', '.join(history)}. Recommend the next item.\n"
        out.append((prompt, (7 * i + 2) % 10, history))
    return out


def test_dataset_completion_is_the_tree_path(tree, tiny_tokenizer, tiny_titles):
    data = rows(tiny_titles)
    ds = build_sft_dataset([r[0] for r in data], [r[1] for r in data], tree, tiny_tokenizer, weights=[1.0] * 8)
    for (prompt, item, _), ids, mask in zip(data, ds["input_ids"], ds["completion_mask"]):
        path, n = tree.item_paths(torch.tensor([item]))
        completion = [t for t, m in zip(ids, mask) if m]
        assert completion == path[0, : int(n[0])].tolist()
        assert completion[-1] == tiny_tokenizer.eos_token_id == tree.terminator_id
        assert ids[: len(ids) - len(completion)] == tiny_tokenizer(prompt)["input_ids"]
    assert ds["weight"] == [1.0] * 8


CONFIG = dict(
    max_steps=2,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
    use_cpu=True,
    bf16=False,
)


@pytest.mark.parametrize("method", ["sft", "ifair"])
def test_train_few_steps(method, tiny_model_dir, tree, tiny_tokenizer, tiny_titles, tmp_path):
    torch.set_num_threads(1)
    data = rows(tiny_titles)
    trainer = train_sft(
        method,
        tiny_model_dir,
        [r[0] for r in data],
        [r[1] for r in data],
        tmp_path / "out",
        tree=tree,
        tokenizer=tiny_tokenizer,
        histories=[r[2] for r in data],
        target_titles=[tiny_titles[r[1]] for r in data],
        train=False,
        **CONFIG,
    )
    assert isinstance(trainer, IFairSFTTrainer) == (method == "ifair")
    # labels: −100 on the prompt, the path on the completion
    example = trainer.train_dataset[0]
    n_prompt = len(tiny_tokenizer(data[0][0])["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = trainer.compute_loss(model, dict(batch))
    if method == "ifair":
        # the trainer's loss is the weighted, response-normalised loss of the batch with the IFairLRS weights
        weights = ifair_sample_weights([r[2] for r in data], [tiny_titles[r[1]] for r in data])[0]
        assert len(set(weights.round(5))) > 1  # the tiny rows really are reweighted
        assert set(batch["weight"].numpy().round(5)) <= set(weights.astype(np.float32).round(5))
        assert loss.item() == pytest.approx(reference_loss(logits, batch["labels"], batch["weight"]), rel=1e-4)
    else:
        # TRL's token mean over the response tokens
        shift = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1)
        mask = shift != -100
        nll = -logp[mask].gather(1, shift[mask].unsqueeze(1)).mean()
        assert loss.item() == pytest.approx(nll.item(), rel=1e-4)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_ifair_requires_histories(tiny_model_dir, tree, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="histories"):
        train_sft("ifair", tiny_model_dir, ["x"], [0], tmp_path, tree=tree, tokenizer=tiny_tokenizer, train=False)
    with pytest.raises(ValueError, match="method"):
        train_sft("dpo", tiny_model_dir, ["x"], [0], tmp_path, tree=tree, tokenizer=tiny_tokenizer, train=False)
