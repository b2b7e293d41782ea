"""End-to-end tests for `GFlowGRTrainer` on a tiny random Qwen2 (width 32, 1 layer) and a 24-item catalogue.

Knobs are shrunk so the file runs in seconds: 3 levels × 4 codes, 8 training rows, batch 4, 2 steps, lr 1e-2 (so
two steps visibly move the heads), no sentence encoder (random item vectors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_flower.gflowgr import GFlowGRConfig, GFlowGRTrainer, SemanticIDs, fit_semantic_ids
from trl_flower.gflowgr.trainer import HEADS_FILE
from trl_flower.tiny import build_model, build_tokenizer

M = 24


@pytest.fixture()
def setup():
    ids = fit_semantic_ids(np.random.default_rng(0).normal(size=(M, 8)), num_levels=3, codebook_size=4, seed=0)
    tok = build_tokenizer(["The user watched these items. Recommend the next one."], vocab_size=300)
    ids.add_code_tokens(tok)
    model = build_model(tok, hidden_size=32, num_layers=1)
    rng = np.random.default_rng(1)
    rows = []
    for r in range(8):
        hist = rng.choice(M, size=3, replace=False).tolist()
        pos = int(rng.choice([i for i in range(M) if i not in hist]))
        prompt = "The user watched " + " ".join(ids.item_strings(hist)) + ". Recommend the next one."
        rows.append({"prompt": prompt, "item_id": pos, "history": hist, "row_index": r})
    cm = rng.normal(size=(8, M)).astype(np.float32)
    return ids, tok, model, Dataset.from_list(rows), cm


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_cpu=True,
    )
    base.update(kw)
    return GFlowGRConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [
        dict(gfn_loss="tb"),  # paper default: curriculum + CM scores + sum + prompt log Z
        dict(gfn_loss="db", sampling_strategy="logs", reward_fusion="weighted"),
        dict(gfn_loss="tb", log_z="scalar", sampling_strategy="beam", score_source="model", num_augmented=2),
        dict(gfn_loss="tb", detach_head_inputs=True, sampling_strategy="random"),  # heads learn on detached states
    ],
)
def test_train_moves_heads_and_exports_clean_model(setup, tmp_path, kw):
    ids, tok, model, ds, cm = setup
    trainer = GFlowGRTrainer(
        model, args=_args(tmp_path, **kw), train_dataset=ds, processing_class=tok, semantic_ids=ids, cm_scores=cm
    )
    before = {k: v.clone() for k, v in trainer.gfn_modules.state_dict().items()}
    emb = model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    after = trainer.gfn_modules.state_dict()
    learned = [k for k, p in trainer.gfn_modules.named_parameters()]
    assert learned
    for k in learned:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"
    assert not torch.equal(emb, model.get_input_embeddings().weight)
    logs = [h for h in trainer.state.log_history if "gfn_loss" in h]
    assert logs and all(np.isfinite(h["gfn_loss"]) and np.isfinite(h["sft_loss"]) for h in logs)

    out = tmp_path / "export"
    trainer.save_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    sd = reloaded.state_dict()
    assert not any("head" in k and "lm_head" not in k for k in sd)
    assert not any(k.startswith(("heads", "reward", "gfn")) for k in sd)
    assert set(torch.load(out / HEADS_FILE)) == set(trainer.gfn_modules.state_dict())
    assert (SemanticIDs.load(out).codes == ids.codes).all()
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tok)


def test_sft_only_and_recommend_over_codes(setup, tmp_path):
    from trl_flower.evaluation.recommend import recommend

    ids, tok, model, ds, cm = setup
    trainer = GFlowGRTrainer(
        model,
        args=_args(tmp_path, gfn_loss="none", sampling_strategy="random", score_source="none"),
        train_dataset=ds,
        processing_class=tok,
        semantic_ids=ids,
    )
    trainer.train()
    assert not list(trainer.gfn_modules["heads"].parameters())  # SFT only: no flow or log Z parameters
    recs = recommend(model, tok, ds["prompt"][:2], trainer.tree, top_k=3, show_progress=False)
    assert recs.item_ids.shape == (2, 3) and (recs.item_ids >= 0).all()


def test_config_validation_and_missing_cm_scores(setup, tmp_path):
    with pytest.raises(ValueError, match="gfn_loss"):
        GFlowGRConfig(output_dir=str(tmp_path), gfn_loss="subtb")
    with pytest.raises(ValueError, match="gfn_lambda"):
        GFlowGRConfig(output_dir=str(tmp_path), gfn_lambda=-1.0)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        GFlowGRConfig(output_dir=str(tmp_path), remove_unused_columns=True)
    c = GFlowGRConfig(output_dir=str(tmp_path))
    assert (c.gfn_loss, c.gfn_lambda, c.num_augmented, c.sampling_strategy, c.reward_fusion) == (
        "tb",
        1.0,
        3,
        "curriculum",
        "sum",
    )
    ids, tok, model, ds, _ = setup
    with pytest.raises(ValueError, match="cm_scores"):
        GFlowGRTrainer(model, args=_args(tmp_path), train_dataset=ds, processing_class=tok, semantic_ids=ids)
