"""Tests for `FlowerTrainer` (style of TRL's tests/experimental/test_gmpo_trainer.py).

A tiny random Qwen2 (2 layers, width 64) saved to disk and the 10-title catalogue of conftest.py. Every knob is
shrunk: 4 prompts per step (enough for distinct samples), 1–4 steps, max_completion_length 8 (the longest title path
is 7 tokens with the terminator), a large learning rate (1e-3) so that two steps visibly move every parameter, no
saving unless the test is about saving. The whole file runs in well under two minutes on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_flower import FlowerConfig, FlowerTrainer, checkpoint
from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree

# Interaction counts per item id: item 9 has none, so the flow-following sampler must never produce it; items 3 and 4
# share the title "Blue Train".
COUNTS = [5, 1, 9, 3, 3, 7, 2, 4, 6, 0]
ITEM_GROUPS = [3, 6, 0, 4, 4, 1, 5, 4, 2, 7]  # popularity group per item id (0 = most popular)
NUM_ROWS = 16


@pytest.fixture(scope="module")
def tree(tiny_titles, tiny_tokenizer):
    return PrefixTree.from_titles(tiny_titles, tiny_tokenizer, item_rewards=COUNTS)


def _prompt(titles, i):
    history = f"{titles[i % 10]}, {titles[(i + 3) % 10]}"
    return f"The user has enjoyed the following items before: {history}. Recommend the next item.\n"


@pytest.fixture(scope="module")
def dataset(tiny_titles):
    """16 rows: a text prompt ending on a token boundary ("\\n"), the target item id and the row index."""
    rows = [{"prompt": _prompt(tiny_titles, i), "item_id": (7 * i) % 10, "row_index": i} for i in range(NUM_ROWS)]
    return Dataset.from_list(rows)


def make_config(tmp_path, **kwargs) -> FlowerConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,  # 4 prompts per step: small, yet several distinct items are sampled
        max_steps=2,  # two steps are enough to move every parameter with the large learning rate below
        learning_rate=1e-3,
        max_completion_length=8,  # longest tiny title path: 7 tokens with the terminator
        flow_lambda=0.5,  # a large λ so that the flow loss dominates the gradient in these short runs
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=0,
    )
    defaults.update(kwargs)
    return FlowerConfig(**defaults)


def make_trainer(model_dir, tree, dataset, tmp_path, trainer_kwargs=None, **config_kwargs) -> FlowerTrainer:
    return FlowerTrainer(
        str(model_dir),
        tree,
        args=make_config(tmp_path, **config_kwargs),
        train_dataset=dataset,
        **(trainer_kwargs or {}),
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_all_changed(before: dict, model) -> None:
    for name, param in before.items():
        assert not torch.equal(param, model.get_parameter(name)), f"parameter {name} has not changed"


def max_param_diff(a, b) -> float:
    b_params = dict(b.named_parameters())
    return max((p - b_params[name]).abs().max().item() for name, p in a.named_parameters())


class TestFlowerTrainer:
    @pytest.mark.parametrize(
        ("flow_loss", "support"),
        [
            ("flower_subtb", "vocabulary"),
            ("db", "vocabulary"),
            ("tb", "vocabulary"),
            ("full_distribution", "vocabulary"),
            ("flower_subtb", "tree"),
            ("full_distribution", "tree"),
        ],
    )
    def test_training(self, flow_loss, support, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(
            tiny_model_dir,
            tree,
            dataset,
            tmp_path,
            trainer_kwargs={"item_groups": ITEM_GROUPS},
            flow_loss=flow_loss,
            flow_policy_support=support,
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()

        assert trainer.state.log_history[-1]["train_loss"] is not None
        assert_all_changed(before, trainer.model)
        for key in ("sft_loss", "flow_loss", "loss"):
            values = logged(trainer, key)
            assert len(values) == 2 and all(np.isfinite(values)), key
        assert logged(trainer, "sampled/valid_share") == [1.0, 1.0]
        assert all(1 <= n <= 4 for n in logged(trainer, "sampled/distinct_items"))
        shares = np.array([logged(trainer, f"sampled/group_{g}_share") for g in range(8)])  # [G, steps]
        np.testing.assert_allclose(shares.sum(axis=0), 1.0)
        assert np.all(shares[7] == 0.0)  # group 7 holds only item 9, which has zero reward
        lengths = logged(trainer, "sampled/mean_length")  # tiny item paths: 3 to 7 tokens with the terminator
        assert len(lengths) == 2 and all(3.0 <= n <= 7.0 for n in lengths)
        assert all(0.0 <= r <= 1.0 for r in logged(trainer, "sampled/reward_mean"))  # rewards of catalogue items

    def test_tree_support_flow_loss_ignores_off_tree_tokens(self, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path, flow_policy_support="tree")
        trainer.sample_in_loss_step = False  # a batch with the samples and their targets in it
        batch = trainer._generate_and_score_completions([dataset[i] for i in range(8)])
        assert batch["flow_child_tokens"].shape[:2] == batch["flow_log_term_target"].shape
        with torch.no_grad():
            continuation = [(batch["flow_title_ids"], batch["flow_title_mask"])]
            logits = trainer._state_logits(trainer.model, batch["prompt_ids"], batch["prompt_mask"], continuation)[0]
            off_tree = next(t for t in range(logits.shape[-1]) if t not in set(np.asarray(tree.token).tolist()))
            bumped = logits.clone()
            bumped[..., off_tree] += 5.0  # move probability mass onto a token that no title uses
            on_tree = [trainer._flow_loss(x, batch) for x in (logits, bumped)]
            trainer.args.flow_policy_support = "vocabulary"
            official = [trainer._flow_loss(x, batch) for x in (logits, bumped)]
        assert torch.isfinite(on_tree[0]) and on_tree[0] > 0
        torch.testing.assert_close(on_tree[0], on_tree[1])
        assert abs(official[0].item() - official[1].item()) > 1e-3

    def test_title_log_term_reaches_the_reward_model(self, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path, title_log_term="flow")
        assert trainer.reward_model.title_log_term == "flow"
        # "Back to Life" (item 0) is passed on the way to "Back to Life Again" (item 1): its own log R/F is the target
        path, length = tree.item_paths(torch.tensor([1]))
        targets = trainer.reward_model.token_targets(path)
        node_title = tree.item_node[0]
        own = float(np.log(tree.item_rewards[0]) - trainer.reward_model.tree.log_flow[tree.parent[node_title]])
        assert own in [pytest.approx(v) for v in targets.log_term_target[0].tolist()]

    def test_samples_are_positive_reward_catalogue_items(self, tiny_model_dir, tree, dataset, tmp_path, tiny_titles):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path)
        trainer.sample_in_loss_step = False  # GRPO's generate path (the in-loss sampler: test_sample_in_loss_step_*)
        trainer.model.train()
        batch = trainer._generate_and_score_completions([dataset[i] for i in range(NUM_ROWS)])

        targets = trainer.reward_model.token_targets(batch["completion_ids"])
        assert bool(targets.complete.all()) and bool(targets.valid.all())
        assert all(COUNTS[i] > 0 for i in targets.item_ids.tolist())
        texts = trainer.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        assert set(texts) <= set(tiny_titles) - {tiny_titles[9]}
        # the SFT targets are the tree paths of the dataset's items (terminator included)
        paths, lengths = tree.item_paths(torch.tensor(dataset["item_id"]), pad_id=trainer._tokenizer.pad_token_id)
        torch.testing.assert_close(batch["sft_ids"], paths)
        assert batch["sft_num_tokens"].item() == lengths.sum().item()

    def test_lambda_zero_is_sft_trainer(self, tiny_model_dir, tree, dataset, tmp_path, tiny_titles):
        """λ = 0: the same loss trajectory and weights as TRL's SFTTrainer on the same pairs, order and seed.

        "Plain SFT" = `SFTTrainer` on prompt/completion pairs (completion = the title; SFTTrainer appends EOS, which
        is the tree's terminator), completion-only loss, sequential sampling. FlowerTrainer reads the dataset in
        order with `shuffle_dataset=False` (its within-batch shuffle does not change a token mean).
        """
        from trl import SFTConfig, SFTTrainer

        common = dict(
            per_device_train_batch_size=4,
            max_steps=4,
            learning_rate=1e-3,
            logging_steps=1,
            seed=3,
            save_strategy="no",
            disable_tqdm=True,
            report_to="none",
            bf16=False,
        )
        flower = make_trainer(tiny_model_dir, tree, dataset, tmp_path, flow_lambda=0.0, shuffle_dataset=False, **common)

        def no_sampling(*args, **kwargs):
            raise AssertionError("FlowerTrainer sampled although flow_lambda=0")

        flower.model.generate = no_sampling
        flower.train()

        pairs = Dataset.from_list([{"prompt": r["prompt"], "completion": tiny_titles[r["item_id"]]} for r in dataset])
        sft = SFTTrainer(
            str(tiny_model_dir),
            args=SFTConfig(
                output_dir=str(tmp_path / "sft"),
                train_sampling_strategy="sequential",
                gradient_checkpointing=False,
                **common,
            ),
            train_dataset=pairs,
        )
        sft.train()

        flower_losses, sft_losses = logged(flower, "loss"), logged(sft, "loss")
        assert len(flower_losses) == len(sft_losses) == 4
        np.testing.assert_allclose(flower_losses, sft_losses, rtol=0, atol=1e-5)
        np.testing.assert_allclose(logged(flower, "sft_loss"), sft_losses, rtol=0, atol=1e-5)
        assert max_param_diff(flower.model, sft.model) < 1e-5
        assert not logged(flower, "flow_loss") and not logged(flower, "completions/mean_length")

    def test_shared_prompt_forward_equals_stacked_forward(self, tiny_model_dir, tree, dataset, tmp_path):
        """Prompt once + both continuations on its KV cache == [prompt + target ; prompt + sample] rows."""
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path)
        trainer.sample_in_loss_step = False  # a batch with the samples in it
        trainer.model.train()
        batch = trainer._generate_and_score_completions([dataset[i] for i in range(8)])
        results = []
        for shared in (True, False):
            trainer._share_prompt_forward = shared
            trainer.model.zero_grad()
            loss = trainer._compute_loss(trainer.model, batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
            results.append((loss.detach(), grads))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5)

    def test_sample_in_loss_step_gives_positive_reward_catalogue_items(
        self, tiny_model_dir, tree, dataset, tmp_path, tiny_titles
    ):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path)
        assert trainer.sample_in_loss_step and trainer._samples_in_loss_step()
        trainer.model.train()
        batch = trainer._generate_and_score_completions([dataset[i] for i in range(NUM_ROWS)])
        assert "completion_ids" not in batch and batch["flow_uniforms"].shape == (NUM_ROWS, 8)
        sampled = []
        sampler = trainer._sample_items
        trainer._sample_items = lambda *a, **k: sampled.append(sampler(*a, **k)) or sampled[-1]
        trainer._compute_loss(trainer.model, batch).backward()

        targets = trainer.reward_model.token_targets(sampled[0])
        assert bool(targets.complete.all()) and bool(targets.valid.all())
        assert all(COUNTS[i] > 0 for i in targets.item_ids.tolist())
        texts = trainer.processing_class.batch_decode(sampled[0], skip_special_tokens=True)
        assert set(texts) <= set(tiny_titles) - {tiny_titles[9]}
        # the same uniforms give the same samples whatever the micro-batch cut (gradient accumulation)
        half = {k: (v[:4] if torch.is_tensor(v) and v.dim() else v) for k, v in batch.items()}
        trainer._compute_loss(trainer.model, half)
        torch.testing.assert_close(sampled[1], sampled[0][:4, : sampled[1].shape[1]])

    def test_sample_in_loss_step_same_samples_same_loss(self, tiny_model_dir, tree, dataset, tmp_path):
        """Given the samples of the generate path, the in-loss path gives the same loss and gradients."""
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path)
        trainer.model.train()
        rows = [dataset[i] for i in range(8)]
        trainer.sample_in_loss_step = False
        old = trainer._generate_and_score_completions(rows)
        trainer.sample_in_loss_step = True
        new = trainer._generate_and_score_completions(rows)
        trainer._sample_items = lambda *a, **k: old["completion_ids"]
        results = []
        for batch in (old, new):
            trainer.model.zero_grad()
            loss = trainer._compute_loss(trainer.model, batch)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)

    def test_sample_in_loss_step_logs_the_same_sampled_metrics(self, tiny_model_dir, tree, dataset, tmp_path):
        """Flower's `sampled/*` logs are the same on both paths; GRPO's completion logs come from TRL's generate path
        only (no copy of them in FlowerTrainer); on that path Flower's reward mean is TRL's."""
        runs = {}
        for in_loss in (True, False):
            trainer = make_trainer(
                tiny_model_dir, tree, dataset, tmp_path / str(in_loss), trainer_kwargs={"item_groups": ITEM_GROUPS}
            )
            trainer.sample_in_loss_step = in_loss
            trainer.train()
            runs[in_loss] = trainer
        keys = [{k for entry in t.state.log_history for k in entry if k.startswith("sampled/")} for t in runs.values()]
        assert keys[0] == keys[1] and "sampled/reward_mean" in keys[0] and "sampled/group_7_share" in keys[0]
        assert logged(runs[True], "sampled/valid_share") == [1.0, 1.0]
        assert not logged(runs[True], "completions/mean_length")  # TRL's generate-path logs are not re-implemented
        np.testing.assert_allclose(
            logged(runs[False], "sampled/reward_mean"), logged(runs[False], "rewards/prefix_tree_reward/mean")
        )
        assert runs[True].state.num_input_tokens_seen > 0  # the trainer state still counts the in-loss tokens

    def test_offline_batches_train_the_flow_loss_on_the_target_paths(self, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path, offline_trajectory_prob=1.0)
        rows = [dataset[i] for i in range(8)]
        batch = trainer._generate_and_score_completions(rows)
        assert "flow_uniforms" not in batch and "completion_ids" not in batch  # nothing was sampled
        items = torch.tensor([r["item_id"] for r in rows])
        paths, lengths = tree.item_paths(items, pad_id=trainer._tokenizer.pad_token_id)
        expected = trainer.reward_model.token_targets(paths)
        torch.testing.assert_close(batch["flow_lengths"], lengths - 1)  # title tokens, terminator excluded
        torch.testing.assert_close(batch["flow_log_reward"], expected.log_reward)
        torch.testing.assert_close(batch["flow_valid"], torch.tensor([COUNTS[i] > 0 for i in items.tolist()]))
        title = torch.where(batch["flow_title_mask"], batch["flow_title_ids"], -1)
        torch.testing.assert_close(title, torch.where(batch["flow_title_mask"], paths[:, :-1], -1))

        trainer.train()
        assert logged(trainer, "flow/offline_batch") == [1.0, 1.0]
        assert all(np.isfinite(logged(trainer, "flow_loss")))
        assert not logged(trainer, "sampled/valid_share")  # offline paths are not logged as the policy's samples

    def test_offline_probability_schedule(self, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(
            tiny_model_dir,
            tree,
            dataset,
            tmp_path,
            max_steps=3,
            offline_trajectory_prob=1.0,
            offline_trajectory_prob_final=0.0,
        )
        trainer.train()
        assert logged(trainer, "flow/offline_prob") == [1.0, 0.5, 0.0]
        assert logged(trainer, "flow/offline_batch")[0] == 1.0 and logged(trainer, "flow/offline_batch")[2] == 0.0
        assert len(logged(trainer, "sampled/valid_share")) >= 1  # the last step sampled on-policy

    def test_gradient_accumulation(self, tiny_model_dir, tree, dataset, tmp_path):
        """GA=2 with half the batch == GA=1 with the full batch (same generation batch, hence the same samples).

        Exact with "tb" (a mean over samples, so the mean of two half-batch means is the full mean) because the
        SFT part is normalised by the target tokens of the whole step; SubTB/DB average over a varying number of
        segments per micro-batch and are only approximately invariant, as in the official code.
        """
        full = make_trainer(tiny_model_dir, tree, dataset, tmp_path / "full", flow_loss="tb", max_steps=3)
        full.train()
        half = make_trainer(
            tiny_model_dir,
            tree,
            dataset,
            tmp_path / "half",
            flow_loss="tb",
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        )
        half.train()
        np.testing.assert_allclose(logged(full, "loss"), logged(half, "loss"), rtol=1e-5)
        assert max_param_diff(full.model, half.model) < 1e-4

    def test_peft_lora(self, tiny_model_dir, tree, dataset, tmp_path):
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path, trainer_kwargs={"peft_config": lora})
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()

        for name, param in before.items():
            new = trainer.model.get_parameter(name)
            if "lora_B" in name:  # lora_B starts at 0 and is the first adapter matrix to move
                assert not torch.equal(param, new), f"adapter parameter {name} has not changed"
            elif "lora_" not in name:
                assert torch.equal(param, new), f"base parameter {name} changed under LoRA"
        trainer.save_model(str(tmp_path / "adapter"))
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
        assert checkpoint.has_tree(tmp_path / "adapter")  # an adapter run is evaluable too

    def test_resume_from_checkpoint(self, tiny_model_dir, tree, dataset, tmp_path):
        """Stopping at step 2 and resuming gives the uninterrupted run exactly (sampling RNG included)."""
        save = dict(max_steps=4, save_strategy="steps", save_steps=2)
        straight = make_trainer(tiny_model_dir, tree, dataset, tmp_path / "a", **save)
        straight.train()
        step_2 = tmp_path / "a" / "out" / "checkpoint-2"
        assert checkpoint.has_tree(step_2)  # every checkpoint is evaluable on its own

        resumed = make_trainer(tiny_model_dir, tree, dataset, tmp_path / "b", **save)
        resumed.train(resume_from_checkpoint=str(step_2))
        assert resumed.state.global_step == 4
        np.testing.assert_allclose(logged(resumed, "loss")[-2:], logged(straight, "loss")[-2:], rtol=1e-6)
        assert max_param_diff(straight.model, resumed.model) < 1e-6

    def test_resume_continues_the_offline_draws(self, tiny_model_dir, tree, dataset, tmp_path):
        """The offline/on-policy draws come from their own generator; a resumed run continues its sequence."""
        save = dict(max_steps=8, save_strategy="steps", save_steps=4, offline_trajectory_prob=0.5)
        straight = make_trainer(tiny_model_dir, tree, dataset, tmp_path / "a", **save)
        straight.train()
        draws = logged(straight, "flow/offline_batch")
        assert len(draws) == 8 and draws[:4] != draws[4:]  # a restarted generator would repeat the first half
        resumed = make_trainer(tiny_model_dir, tree, dataset, tmp_path / "b", **save)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-4"))
        assert logged(resumed, "flow/offline_batch")[-4:] == draws[4:]  # log_history holds steps 1-4 too

    def test_saved_model_is_a_plain_hf_directory(self, tiny_model_dir, tree, dataset, tmp_path):
        from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GenerationConfig

        trainer = make_trainer(
            tiny_model_dir, tree, dataset, tmp_path, trainer_kwargs={"item_groups": ITEM_GROUPS}, max_steps=1
        )
        trainer.train()
        out = tmp_path / "flower"
        trainer.save_model(str(out))

        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert max_param_diff(reloaded, trainer.model) == 0.0
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.chat_template == trainer.processing_class.chat_template
        assert AutoProcessor.from_pretrained(out).eos_token_id == tokenizer.eos_token_id  # TRL's own loader
        generation = GenerationConfig.from_pretrained(out)
        assert generation.pad_token_id == tokenizer.pad_token_id
        assert tokenizer.eos_token_id in np.atleast_1d(generation.eos_token_id)

        saved_tree = checkpoint.load_tree(out)
        np.testing.assert_array_equal(saved_tree.token, tree.token)
        np.testing.assert_array_equal(saved_tree.item_rewards, COUNTS)
        np.testing.assert_array_equal(checkpoint.load_item_groups(out), ITEM_GROUPS)
        info = checkpoint.read_record(out)
        assert info["terminator_id"] == tree.terminator_id == tokenizer.eos_token_id
        assert (info["tokenization_mode"], info["reward_variant"]) == ("default", "none")
        assert (info["flow_loss"], info["flow_lambda"]) == ("flower_subtb", 0.5)
        # every Flower field of the config is recorded, so a field added to FlowerConfig is saved without more code
        assert info["offline_trajectory_prob"] == 0.0 and info["flow_policy_support"] == "vocabulary"

    def test_model_card_has_the_paper_and_the_flower_settings(self, tiny_model_dir, tree, dataset, tmp_path):
        trainer = make_trainer(tiny_model_dir, tree, dataset, tmp_path, max_steps=1, flow_lambda=0.25)
        trainer.create_model_card(model_name="flower-tiny", dataset_name="Tiny_Items")
        card = checkpoint.model_card_path(trainer.args.output_dir).read_text()
        assert "2503.07377" in card and "@article{flower2025" in card  # TRL's card: method paper and citation
        assert "## Flower settings" in card and "| `flow_lambda` | 0.25 |" in card
        trainer.create_model_card(model_name="flower-tiny")  # a second card replaces the first, section once
        assert checkpoint.model_card_path(trainer.args.output_dir).read_text().count("## Flower settings") == 1

    def test_evaluate(self, tiny_model_dir, tree, dataset, tmp_path):
        """Evaluation runs the same loss (sampling included) on the eval set; nothing is trained."""
        trainer = FlowerTrainer(
            str(tiny_model_dir),
            tree,
            args=make_config(tmp_path, per_device_eval_batch_size=4),
            train_dataset=dataset,
            eval_dataset=dataset.select(range(4)),
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        metrics = trainer.evaluate()
        assert np.isfinite([metrics["eval_loss"], metrics["eval_sft_loss"], metrics["eval_flow_loss"]]).all()
        assert metrics["eval_sampled/valid_share"] == 1.0
        assert all(torch.equal(param, trainer.model.get_parameter(name)) for name, param in before.items())

    def test_conversational_prompts(self, tiny_model_dir, tree, dataset, tmp_path):
        chat = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"].strip()}]})
        trainer = make_trainer(tiny_model_dir, tree, chat, tmp_path, max_steps=1)
        trainer.train()
        assert logged(trainer, "sampled/valid_share") == [1.0]
        assert np.isfinite(logged(trainer, "flow_loss")).all()

    def test_reference_tokenization_mode(self, tiny_model_dir, tiny_titles, tiny_tokenizer, dataset, tmp_path):
        """Official split: tree titles end with "\\n", samples get EOS after it, SFT targets are `completion` + EOS."""
        newline = tiny_tokenizer.convert_tokens_to_ids("Ċ")  # byte-level "\n"
        tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer, terminator_id=newline, item_rewards=COUNTS)
        data = dataset.map(lambda row: {"completion": tiny_titles[row["item_id"]] + "\n"})
        trainer = make_trainer(
            tiny_model_dir, tree, data, tmp_path, tokenization_mode="reference", max_completion_length=9
        )
        trainer.model.train()
        eos = tiny_tokenizer.eos_token_id
        # the in-loss sampler: the title's "\n", then the forced EOS
        in_loss = trainer._generate_and_score_completions([data[i] for i in range(4)])
        sampled = []
        sampler = trainer._sample_items
        trainer._sample_items = lambda *a, **k: sampled.append(sampler(*a, **k)) or sampled[-1]
        assert torch.isfinite(trainer._compute_loss(trainer.model, in_loss))
        for ids in sampled[0].tolist():
            ids = ids[: ids.index(eos) + 1]
            assert ids[-2:] == [newline, eos]
        trainer.sample_in_loss_step = False  # GRPO's generate path
        batch = trainer._generate_and_score_completions([data[i] for i in range(4)])
        for ids, mask in zip(batch["completion_ids"], batch["completion_mask"]):
            ids = ids[mask.bool()].tolist()
            assert ids[-2:] == [newline, eos]
        for ids, mask, row in zip(batch["sft_ids"], batch["sft_mask"], data):
            expected = tiny_tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
            assert ids[mask].tolist() == expected
        trainer.train()
        assert logged(trainer, "sampled/valid_share") == [1.0, 1.0]

    def test_default_args(self, tiny_model_dir, tree, dataset, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        trainer = FlowerTrainer(str(tiny_model_dir), tree, train_dataset=dataset)
        assert isinstance(trainer.args, FlowerConfig) and trainer.args.output_dir.endswith("-Flower")
        assert trainer.args.num_generations == 1
        if not torch.cuda.is_available():
            assert trainer.args.bf16 is False  # TRL's default bf16=True would have raised on this CPU-only machine

    @pytest.mark.parametrize("variant", ["div_s", "exact"])
    def test_personalised_rewards(self, variant, tiny_model_dir, tree, dataset, tmp_path):
        """The row of each prompt reaches the reward model: SASRec-like logits [rows, items] from a .npy file."""
        scores = tmp_path / "scores.npy"
        np.save(scores, np.random.default_rng(0).normal(size=(NUM_ROWS, len(COUNTS))))
        trainer = make_trainer(
            tiny_model_dir,
            tree,
            dataset,
            tmp_path,
            max_steps=1,
            reward_variant=variant,
            preference_scores_path=str(scores),
        )
        assert trainer.reward_model.variant == variant
        trainer.train()
        assert logged(trainer, "sampled/valid_share") == [1.0]
        assert np.isfinite(logged(trainer, "flow_loss")).all()


class TestFlowerTrainerErrors:
    def test_max_completion_length_shorter_than_an_item(self, tiny_model_dir, tree, dataset, tmp_path):
        with pytest.raises(ValueError, match="max_completion_length=4 is shorter than the longest item path"):
            make_trainer(tiny_model_dir, tree, dataset, tmp_path, max_completion_length=4)

    def test_default_mode_needs_an_eos_terminator(self, tiny_model_dir, tiny_titles, tiny_tokenizer, dataset, tmp_path):
        newline = tiny_tokenizer("\n")["input_ids"][0]
        newline_tree = PrefixTree.from_titles(tiny_titles, tiny_tokenizer, terminator_id=newline)
        with pytest.raises(ValueError, match="tokenization_mode='default' needs item paths that end with an EOS"):
            make_trainer(tiny_model_dir, newline_tree, dataset, tmp_path)

    @pytest.mark.parametrize(
        "change, message",
        [
            (lambda ds: ds.remove_columns("item_id"), "train_dataset has no column 'item_id'"),
            (lambda ds: ds.map(lambda r: {"item_id": r["item_id"] + 10}), r"must hold integer item ids in \[0, 10\)"),
        ],
    )
    def test_bad_dataset(self, change, message, tiny_model_dir, tree, dataset, tmp_path):
        with pytest.raises(ValueError, match=message):
            make_trainer(tiny_model_dir, tree, change(dataset), tmp_path)

    def test_reference_mode_needs_completion_column(self, tiny_model_dir, tree, dataset, tmp_path):
        with pytest.raises(ValueError, match="no column 'completion'"):
            make_trainer(tiny_model_dir, tree, dataset, tmp_path, tokenization_mode="reference")

    def test_bad_item_groups(self, tiny_model_dir, tree, dataset, tmp_path):
        with pytest.raises(ValueError, match=r"one popularity group per item id, shape \(10,\)"):
            make_trainer(tiny_model_dir, tree, dataset, tmp_path, trainer_kwargs={"item_groups": [0, 1, 2]})

    def test_reward_model_and_config_disagree(
        self, tiny_model_dir, tree, dataset, tmp_path, tiny_titles, tiny_tokenizer
    ):
        reward = PrefixTreeRewardModel(tree, nonterminal_log_term=-10.0)
        with pytest.raises(ValueError, match="nonterminal_log_term=-10.0 differs"):
            make_trainer(tiny_model_dir, tree, dataset, tmp_path, trainer_kwargs={"reward_model": reward})
        other = PrefixTree.from_titles(tiny_titles[:5], tiny_tokenizer)
        with pytest.raises(ValueError, match="built on another tree"):
            make_trainer(
                tiny_model_dir, tree, dataset, tmp_path, trainer_kwargs={"reward_model": PrefixTreeRewardModel(other)}
            )
        scores = tmp_path / "scores.npy"
        np.save(scores, np.zeros((NUM_ROWS, 10)))
        with pytest.raises(ValueError, match="pass either `reward_model` or the config's reward fields"):
            make_trainer(
                tiny_model_dir,
                tree,
                dataset,
                tmp_path,
                trainer_kwargs={"reward_model": PrefixTreeRewardModel(tree)},
                reward_variant="div_s",
                preference_scores_path=str(scores),
            )
