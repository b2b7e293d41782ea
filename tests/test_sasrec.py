"""SASRec baseline: shapes, masking, the loss against its formula, learning a deterministic task, persistence, export.

Everything except the `slow` test runs on tiny models (hidden 16-32, catalogues of 12-40 items) in a few seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trl_flower.baselines.sasrec import (
    CONFIG_NAME,
    SASRec,
    SASRecConfig,
    SASRecTrainingArguments,
    SequenceSplit,
    encode_histories,
    evaluate_sasrec,
    export_split_logits,
    fit_sasrec,
    full_ranking_metrics,
    sample_negatives,
    save_row_logits,
    train_sasrec,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the models are tiny, and on a busy 2-core machine extra threads only spin (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(num_items=12, max_len=6, hidden_size=16, seed=0, **kw) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=num_items, max_len=max_len, hidden_size=hidden_size, **kw)).eval()


def _successor_split(num_items: int, rows: int, max_len: int, seed: int) -> SequenceSplit:
    """Histories are runs of consecutive ids (mod N) of random length; the target is the next id in the run."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, num_items, (rows,), generator=g)  # [R]
    lengths = torch.randint(1, max_len + 1, (rows,), generator=g)  # [R]
    histories = [[(s + j) % num_items for j in range(n)] for s, n in zip(starts.tolist(), lengths.tolist())]
    seq, lens = encode_histories(histories, num_items, max_len)
    return SequenceSplit(seq, lens, (starts + lengths) % num_items)


# ----------------------------------------------------------------------------------------------------- encoding


def test_encode_histories_pads_right_and_keeps_most_recent():
    seq, lengths = encode_histories([[3], [1, 2, 4], list(range(8))], num_items=9, max_len=4)
    assert seq.tolist() == [[3, 9, 9, 9], [1, 2, 4, 9], [4, 5, 6, 7]]
    assert lengths.tolist() == [1, 3, 4]


@pytest.mark.parametrize(
    "histories, message", [([[1], []], "history 1 is empty"), ([[1, 9]], "outside \\[0, 9\\)"), ([[-1]], "outside")]
)
def test_encode_histories_errors(histories, message):
    with pytest.raises(ValueError, match=message):
        encode_histories(histories, num_items=9, max_len=4)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SASRecConfig(num_items=10, hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="num_items must be >= 2"):
        SASRecConfig(num_items=1)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        SASRecTrainingArguments(patience=0)


# ------------------------------------------------------------------------------------------- shapes and masking


def test_shapes():
    model = _model(num_items=12, max_len=6, hidden_size=16)
    seq, lengths = encode_histories([[0, 1], [2, 3, 4, 5, 6, 7], [11]], 12, 6)
    assert model(seq, lengths).shape == (3, 16)
    assert model.full_sort_predict(seq, lengths).shape == (3, 12)
    assert model.predict(seq, lengths, torch.tensor([0, 5, 11])).shape == (3,)
    scores = model.score_rows([[0, 1], [2, 3, 4, 5, 6, 7], [11]])
    assert scores.shape == (3, 12) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, model.full_sort_predict(seq, lengths))


def test_predict_matches_full_sort_predict():
    model = _model()
    seq, lengths = encode_histories([[0, 1], [2, 3, 4]], 12, 6)
    items = torch.tensor([7, 2])
    full = model.full_sort_predict(seq, lengths)  # [2, 12]
    torch.testing.assert_close(model.predict(seq, lengths, items), full[torch.arange(2), items])


@pytest.mark.parametrize("num_heads", [1, 2])
def test_padding_positions_do_not_change_the_output(num_heads):
    """Whatever sits after the last real item (pad ids or arbitrary items) leaves the row's output unchanged."""
    model = _model(num_heads=num_heads)
    seq, lengths = encode_histories([[4, 7, 1]], 12, 6)  # [[4, 7, 1, 12, 12, 12]]
    base = model.full_sort_predict(seq, lengths)
    garbage = seq.clone()
    garbage[0, 3:] = torch.tensor([0, 5, 9])
    torch.testing.assert_close(model.full_sort_predict(garbage, lengths), base)


def test_row_output_is_independent_of_its_batch():
    model = _model()
    histories = [[4, 7, 1], [0], [1, 2, 3, 4, 5, 6], [10, 11]]
    batched = model.score_rows(histories)
    for i, h in enumerate(histories):
        torch.testing.assert_close(model.score_rows([h])[0], batched[i])
    # a history longer than max_len is read through its max_len most recent items
    torch.testing.assert_close(model.score_rows([[9, 9, 1, 2, 3, 4, 5, 6]]), model.score_rows([[1, 2, 3, 4, 5, 6]]))


def test_causal_mask_earlier_prefix_output_ignores_later_items():
    """The hidden state at position t only sees items 0..t: a prefix read at its own end equals the full run's state."""
    model = _model()
    seq, _ = encode_histories([[3, 8, 2, 6]], 12, 6)
    prefix, _ = encode_histories([[3, 8]], 12, 6)
    at_2 = model(seq, torch.tensor([2]))  # read the 4-item sequence at position 1
    torch.testing.assert_close(at_2, model(prefix, torch.tensor([2])))


def test_padding_embedding_gets_no_gradient():
    model = _model().train()
    seq, lengths = encode_histories([[1, 2], [3]], 12, 6)
    loss = model.calculate_loss(seq, lengths, torch.tensor([3, 4]), torch.tensor([5, 6]))
    loss.backward()
    assert model.item_emb.weight.grad[model.config.pad_id].abs().sum() == 0
    assert model.item_emb.weight.grad[1].abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ the loss


def test_loss_is_bce_with_one_positive_and_one_negative():
    model = _model()  # eval mode: dropout off, so the loss is a deterministic function of the logits
    seq, lengths = encode_histories([[0, 1], [2, 3, 4], [5], [6, 7, 8, 9]], 12, 6)
    pos = torch.tensor([2, 5, 6, 10])
    neg = torch.tensor([7, 0, 11, 3])
    logits = model.full_sort_predict(seq, lengths).double()  # [4, 12]
    s_pos = logits[torch.arange(4), pos]
    s_neg = logits[torch.arange(4), neg]
    sigma = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
    expected = -(torch.log(sigma(s_pos)) + torch.log(1 - sigma(s_neg))).sum() / (2 * 4)
    got = model.calculate_loss(seq, lengths, pos, neg)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_negatives_are_uniform_over_the_other_items():
    g = torch.Generator().manual_seed(0)
    num_items, n = 5, 40_000
    targets = torch.full((n,), 2)
    neg = sample_negatives(targets, num_items, g)
    assert not (neg == targets).any()
    counts = torch.bincount(neg, minlength=num_items).double() / n
    expected = torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=torch.double)
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    # every item can be a negative of some target, including the last id and id 0
    both_ends = sample_negatives(torch.tensor([0] * 200 + [4] * 200), num_items, g)
    assert set(both_ends[:200].tolist()) == {1, 2, 3, 4} and set(both_ends[200:].tolist()) == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------------ metrics


def test_full_ranking_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=g)
    logits[0, :] = 0.0  # all tied: the target ranks after the smaller ids
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[0] = 7
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices  # [50, 30]
    ranks = (order == targets[:, None]).float().argmax(1).double()  # [50]
    assert ranks[0] == 7
    out = full_ranking_metrics(logits, targets, ks=(1, 5, 20))
    for k in (1, 5, 20):
        hit = (ranks < k).double()
        assert out[f"HR@{k}"] == pytest.approx(hit.mean().item())
        assert out[f"NDCG@{k}"] == pytest.approx((hit / torch.log2(ranks + 2)).mean().item())


# ------------------------------------------------------------------------------------------------------ training


def test_learns_a_deterministic_next_item_task():
    """Next item = last item + 1 (mod N): a few epochs must beat random ranking (HR@1 = 1/N) by far."""
    torch.manual_seed(0)
    n = 30
    train, valid = _successor_split(n, 1000, 6, seed=1), _successor_split(n, 300, 6, seed=2)
    model = SASRec(SASRecConfig(num_items=n, max_len=6, hidden_size=32))
    before = full_ranking_metrics(model.eval().full_sort_predict(valid.seq, valid.lengths), valid.targets, (1, 5))
    # lr 1e-2 and batch 256 (not the paper's 1e-3 / 1024): ~25 steps are enough on this small task
    args = SASRecTrainingArguments(epochs=6, patience=6, lr=1e-2, batch_size=256, eval_k=5, seed=0, progress=False)
    result = train_sasrec(model, train, valid, args)
    after = full_ranking_metrics(model.full_sort_predict(valid.seq, valid.lengths), valid.targets, (1, 5))
    assert before["HR@5"] < 0.4
    assert after["HR@1"] > 0.8 > 20 / n  # random ranking: HR@1 = 1/30
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert len(result.history) == result.epochs_run


def test_training_is_deterministic_and_keeps_the_best_epoch():
    n = 20
    train, valid = _successor_split(n, 600, 6, seed=3), _successor_split(n, 200, 6, seed=4)
    args = SASRecTrainingArguments(epochs=6, patience=2, batch_size=128, eval_k=5, seed=7, progress=False)
    states, results = [], []
    for _ in range(2):
        torch.manual_seed(7)
        model = SASRec(SASRecConfig(num_items=n, max_len=6, hidden_size=16))
        results.append(train_sasrec(model, train, valid, args))
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    res = results[0]
    assert res.history == results[1].history
    # the returned weights are the best epoch's: re-evaluating gives the best validation NDCG
    ndcg = full_ranking_metrics(model.full_sort_predict(valid.seq, valid.lengths), valid.targets, (5,))["NDCG@5"]
    assert ndcg == pytest.approx(res.best_valid_ndcg, abs=1e-12)
    assert res.best_valid_ndcg == max(h["valid_NDCG@5"] for h in res.history)
    assert res.history[res.best_epoch - 1]["valid_NDCG@5"] == res.best_valid_ndcg
    assert not model.training


def test_early_stopping_counts_epochs_without_improvement():
    n = 12
    train, valid = _successor_split(n, 100, 4, seed=5), _successor_split(n, 50, 4, seed=6)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=n, max_len=4, hidden_size=8))
    args = SASRecTrainingArguments(epochs=50, patience=3, lr=1e-6, batch_size=64, eval_k=5, seed=0, progress=False)
    res = train_sasrec(model, train, valid, args)  # lr 1e-6: nothing improves after a few epochs
    assert res.stopped_early
    assert res.epochs_run == res.best_epoch + 3


# ------------------------------------------------------------------------------------- persistence and export


def test_save_load_round_trip(tmp_path):
    model = _model(num_items=12, max_len=5, hidden_size=16, num_heads=2)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert cfg == {
        "model_type": "sasrec",
        "num_items": 12,
        "max_len": 5,
        "hidden_size": 16,
        "num_heads": 2,
        "num_blocks": 1,
        "dropout": 0.1,
    }
    loaded = SASRec.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    histories = [[0, 1, 2], [5], [11, 3]]
    torch.testing.assert_close(loaded.score_rows(histories), model.score_rows(histories), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SASRec.from_pretrained(tmp_path)


def test_npy_export_row_order(tmp_path):
    model = _model()
    histories = [[(3 * i + j) % 12 for j in range(1 + i % 5)] for i in range(23)]
    path = save_row_logits(model, histories, tmp_path / "train_logits.npy", batch_size=5)  # several chunks
    arr = np.load(path)
    assert arr.shape == (23, 12) and arr.dtype == np.float32
    for i in (0, 4, 5, 17, 22):  # float rounding of a matmul depends on the batch shape: compare to 1e-6
        np.testing.assert_allclose(arr[i], model.score_rows([histories[i]])[0].numpy(), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def synthetic():
    from trl_flower.data.synthetic import make_synthetic

    return make_synthetic(num_items=40, num_users=60, seed=0)


def test_export_split_logits_and_evaluate(synthetic, tmp_path):
    from trl_flower.data.popularity import popularity_from_histories

    args = SASRecTrainingArguments(epochs=2, batch_size=64, eval_k=5, seed=0, progress=False)
    model, res = fit_sasrec(synthetic, args, hidden_size=16)
    assert res.epochs_run == 2
    paths = export_split_logits(model, synthetic, tmp_path, splits=("train", "test"))
    assert sorted(p.name for p in paths.values()) == ["test_logits.npy", "train_logits.npy"]
    for split, path in paths.items():
        arr = np.load(path)
        ds = synthetic.splits[split]
        assert arr.shape == (ds.num_rows, synthetic.num_items)
        i = ds.num_rows - 1
        row = model.score_rows([ds[i]["history_item_id"]])[0].numpy()
        np.testing.assert_allclose(arr[i], row, rtol=1e-6, atol=1e-6)

    pop = popularity_from_histories(synthetic.splits["train"]["history_item_title"])
    out = evaluate_sasrec(model, synthetic.splits["test"], synthetic.items, pop)
    for key in ("HR@1", "NDCG@5", "HR@20", "NDCG@20", "DGU@10", "MGU@10", "H", "TTR", "item_HR@5", "item_NDCG@20"):
        assert key in out and math.isfinite(out[key]), key
    assert out["invalid"] == 0 and out["num_users"] == synthetic.splits["test"].num_rows
    for k in (1, 3, 5, 10, 20):
        assert out[f"HR@{k}"] >= out[f"item_HR@{k}"]  # a title hit is implied by an item hit
    split = SequenceSplit.from_dataset(synthetic.splits["test"], synthetic.num_items, 10)
    ids = full_ranking_metrics(model.score_rows(synthetic.splits["test"]["history_item_id"]), split.targets)
    assert out["item_HR@5"] == pytest.approx(ids["HR@5"]) and out["item_NDCG@20"] == pytest.approx(ids["NDCG@20"])
    with pytest.raises(ValueError, match="need at least 50 items"):
        evaluate_sasrec(model, synthetic.splits["test"], synthetic.items, pop, ks=(5, 50))

    # a random sample of rows (row_index no longer 0..R-1) can be evaluated: the same rows score the same
    from trl_flower.data import select_rows

    sample = select_rows(synthetic.splits["test"], 7, sample_seed=3)
    assert list(sample["row_index"]) != list(range(7))
    renumbered = sample.remove_columns("row_index")
    assert evaluate_sasrec(model, sample, synthetic.items, pop) == evaluate_sasrec(
        model, renumbered, synthetic.items, pop
    )
    with pytest.raises(ValueError, match="row_index is not 0..R-1"):  # training/export still demand row order
        SequenceSplit.from_dataset(sample, synthetic.num_items, 10)


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_help_and_tiny_run(synthetic, tmp_path, capsys):
    from trl_flower.cli import main
    from trl_flower.data.synthetic import save_synthetic

    with pytest.raises(SystemExit):
        main(["sasrec", "--help"])
    assert "--patience" in capsys.readouterr().out
    assert main(["sasrec", "--data", "d", "--output-dir", "o", "--export-splits", "train,tset"]) == 2
    assert "unknown split(s) ['tset']" in capsys.readouterr().err
    data_dir = save_synthetic(synthetic, tmp_path / "data")
    out = tmp_path / "out"
    rc = main(
        [
            "sasrec",
            "--data",
            str(data_dir),
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--hidden-size",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {
        "model",
        "train_logits.npy",
        "valid_logits.npy",
        "test_logits.npy",
        "metrics.json",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["epochs_run"] == 2 and "HR@5" in metrics["test"]
    assert np.load(out / "train_logits.npy").shape == (synthetic.splits["train"].num_rows, synthetic.num_items)


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_movies_hr5_close_to_paper(data_dir):
    """Paper Table 4, SASRec on Movies_and_TV: HR@5 = 0.1072; we accept 15 % either way (a few minutes on CPU)."""
    from trl_flower.data import load_amazon, popularity_from_histories

    data = load_amazon("Movies_and_TV", data_root=data_dir)
    model, res = fit_sasrec(data, SASRecTrainingArguments(seed=1, progress=False))
    pop = popularity_from_histories(data.splits["train"]["history_item_title"])
    out = evaluate_sasrec(model, data.splits["test"], data.items, pop)
    assert abs(out["item_HR@5"] - 0.1072) / 0.1072 < 0.15, (out, res.best_epoch)
