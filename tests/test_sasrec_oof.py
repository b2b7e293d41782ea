"""Out-of-fold SASRec logits, the target-probability diagnostics and SASRec's epoch lines without a progress bar."""

import json

import numpy as np
import pytest
import torch

from trl_flower.baselines.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecTrainingArguments,
    SequenceSplit,
    out_of_fold_logits,
    target_probability_stats,
    train_sasrec,
)


@pytest.fixture(scope="module")
def synthetic():
    from trl_flower.data.synthetic import make_synthetic

    return make_synthetic(num_items=40, num_users=40, seed=1)


def _args(**kw):
    # 2 epochs of tiny batches: enough to make the fold models differ, fast enough for the fast suite
    return SASRecTrainingArguments(**{"epochs": 2, "batch_size": 32, "eval_k": 5, "seed": 3, "progress": False, **kw})


def test_out_of_fold_rows_come_from_the_model_that_left_their_fold_out(synthetic, tmp_path):
    path = out_of_fold_logits(synthetic, tmp_path / "oof.npy", folds=3, args=_args(), fold_seed=5, hidden_size=8)
    oof = np.load(path)
    train = synthetic.splits["train"]
    assert oof.shape == (train.num_rows, synthetic.num_items) and np.isfinite(oof).all()

    # reference written plainly: fold 1's model trained on the other folds' rows, scoring fold 1's rows
    fold_of_row = np.random.default_rng(5).permutation(train.num_rows) % 3
    full = SequenceSplit.from_dataset(train, synthetic.num_items, 10)
    valid = SequenceSplit.from_dataset(synthetic.splits["valid"], synthetic.num_items, 10)
    kept = torch.from_numpy(np.flatnonzero(fold_of_row != 1))
    held = np.flatnonzero(fold_of_row == 1)
    torch.manual_seed(3)
    model = SASRec(SASRecConfig(num_items=synthetic.num_items, hidden_size=8))
    train_sasrec(model, SequenceSplit(full.seq[kept], full.lengths[kept], full.targets[kept]), valid, _args())
    expected = model.score_rows([train[int(i)]["history_item_id"] for i in held]).numpy()
    np.testing.assert_allclose(oof[held], expected, rtol=1e-5, atol=1e-6)
    # control: another fold's rows were scored by other models, so the same reference does not reproduce them
    other = np.flatnonzero(fold_of_row == 0)
    assert not np.allclose(oof[other], model.score_rows([train[int(i)]["history_item_id"] for i in other]).numpy())


def test_interrupted_out_of_fold_run_leaves_no_logits_file(synthetic, tmp_path, monkeypatch):
    """A run stopped after its first fold must not leave train_logits_oof.npy with zero rows for the other folds."""
    import trl_flower.baselines.sasrec as sasrec

    calls = []
    real = sasrec.train_sasrec

    def stop_after_one_fold(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sasrec, "train_sasrec", stop_after_one_fold)
    with pytest.raises(KeyboardInterrupt):
        out_of_fold_logits(synthetic, tmp_path / "oof.npy", folds=3, args=_args(), hidden_size=8)
    assert calls and not (tmp_path / "oof.npy").exists()
    monkeypatch.setattr(sasrec, "train_sasrec", real)  # control: the same call completes and writes the file
    assert np.load(out_of_fold_logits(synthetic, tmp_path / "oof.npy", folds=3, args=_args(), hidden_size=8)).any()


def test_out_of_fold_rejects_one_fold(synthetic, tmp_path):
    with pytest.raises(ValueError, match="folds must be >= 2"):
        out_of_fold_logits(synthetic, tmp_path / "x.npy", folds=1, args=_args())


def test_target_probability_stats_by_hand():
    # row 0: target 0 has p = e^2 / (e^2 + 2) (rank 0); row 1: target 2 is last of three equal-ish logits
    logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    stats = target_probability_stats(logits, [0, 2])
    p0 = np.exp(2) / (np.exp(2) + 2)
    p1 = 1 / (2 * np.e + 1)
    assert stats["rows"] == 2
    assert stats["mean_p_target"] == pytest.approx((p0 + p1) / 2)
    assert stats["median_p_target"] == pytest.approx(min(p0, p1))  # torch's median of two is the lower one
    assert stats["target_first"] == 0.5 and stats["target_in_top10"] == 1.0
    assert stats["mean_top1_mass"] == pytest.approx((p0 + np.e / (2 * np.e + 1)) / 2)
    q0 = np.array([p0, (1 - p0) / 2, (1 - p0) / 2])
    q1 = np.array([np.e, np.e, 1]) / (2 * np.e + 1)
    entropy = (-(q0 * np.log(q0)).sum() - (q1 * np.log(q1)).sum()) / 2
    assert stats["entropy_nats"] == pytest.approx(entropy)


def test_epoch_lines_without_progress_bar(synthetic, capsys):
    train = SequenceSplit.from_dataset(synthetic.splits["train"], synthetic.num_items, 10)
    valid = SequenceSplit.from_dataset(synthetic.splits["valid"], synthetic.num_items, 10)
    torch.manual_seed(0)
    train_sasrec(SASRec(SASRecConfig(num_items=synthetic.num_items, hidden_size=8)), train, valid, _args(epochs=3))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("SASRec epoch")]
    assert [line.split(":")[0] for line in lines] == ["SASRec epoch 1/3", "SASRec epoch 2/3", "SASRec epoch 3/3"]
    assert "valid NDCG@5" in lines[0]
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=synthetic.num_items, hidden_size=8))
    train_sasrec(model, train, valid, _args(epochs=3, log_every=0))
    assert "SASRec epoch" not in capsys.readouterr().out


def test_cli_writes_out_of_fold_logits_and_diagnostics(synthetic, tmp_path, capsys):
    from trl_flower.cli import main
    from trl_flower.data.synthetic import save_synthetic

    data_dir = save_synthetic(synthetic, tmp_path / "data")
    out = tmp_path / "out"
    base = ["sasrec", "--data", str(data_dir), "--output-dir", str(out), "--epochs", "2", "--batch-size", "64"]
    base += ["--hidden-size", "8", "--no-progress"]
    assert main([*base, "--oof-folds", "1"]) == 2  # argument errors: one line, exit status 2
    assert "--oof_folds must be 0 (skip) or >= 2, got 1" in capsys.readouterr().err
    assert main([*base, "--oof-folds", "2"]) == 0
    oof = np.load(out / "train_logits_oof.npy")
    assert oof.shape == np.load(out / "train_logits.npy").shape
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["target_probability"]) == {"train_logits", "valid_logits", "test_logits", "train_logits_oof"}
    assert report["logits"]["train_oof"].endswith("train_logits_oof.npy")


def test_cli_oof_only_adds_out_of_fold_logits_to_a_saved_run(synthetic, tmp_path, capsys):
    from trl_flower.cli import main
    from trl_flower.data.synthetic import save_synthetic

    data_dir = save_synthetic(synthetic, tmp_path / "data")
    out = tmp_path / "out"
    base = ["sasrec", "--data", str(data_dir), "--output-dir", str(out), "--epochs", "2", "--batch-size", "64"]
    base += ["--hidden-size", "8", "--no-progress"]
    assert main([*base, "--oof_only"]) == 2  # needs --oof_folds
    assert "also pass --oof_folds" in capsys.readouterr().err
    assert main([*base, "--oof_only", "--oof_folds", "2"]) == 2  # nothing saved yet
    assert main(base) == 0
    weights = (out / "model" / "sasrec_model.pt").read_bytes()
    train_logits = np.load(out / "train_logits.npy")
    assert main([*base, "--oof_only", "--oof_folds", "2"]) == 0
    assert (out / "model" / "sasrec_model.pt").read_bytes() == weights  # the saved model was kept, not retrained
    np.testing.assert_array_equal(np.load(out / "train_logits.npy"), train_logits)
    report = json.loads((out / "metrics.json").read_text())
    assert report["logits"]["train_oof"].endswith("train_logits_oof.npy")
    assert report["training"]["epochs_run"] == 2  # the first run's training record is kept
    assert "train_logits_oof" in report["target_probability"]
