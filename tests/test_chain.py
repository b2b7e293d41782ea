"""A Flower checkpoint as reference policy (and policy init) of TRL's DPO, GRPO, RLOO and PPO trainers.

Every trainer runs 2 optimisation steps on a 10-item catalogue with a 0.1 M-parameter Qwen2 (conftest), on CPU:
batch 4, completions of at most 8 tokens, no gradient checkpointing, no saving, no logging backends. The PPO test
needs trl 1.11/1.12 (`trl.experimental.ppo`) and runs in the compatibility environment:
``/work/venv112/bin/python -m pytest -m trl112 tests/test_chain.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import trl

from trl_flower import checkpoint
from trl_flower.chain import (
    PPO_TRL_VERSIONS,
    PPOUnavailableError,
    TreeRewardScorer,
    _constrained_generate,
    load_reference_policy,
    require_ppo,
    set_reference_policy,
)
from trl_flower.rewards import PrefixTreeRewardModel
from trl_flower.tree import PrefixTree

TRL_MINOR = ".".join(trl.__version__.split(".")[:2])
HAS_PPO = TRL_MINOR in PPO_TRL_VERSIONS
PROMPT = "The user has enjoyed the following items before: {}. Recommend the next item.\n"

# CPU-test settings shared by every TRL config: no bf16 on a CPU box, no checkpointing, no saving, 2 steps.
TINY_ARGS = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    max_steps=2,
    logging_steps=1,
    per_device_train_batch_size=4,
    learning_rate=1e-3,  # large, so two steps move a random tiny model measurably
    seed=0,
)


COUNTS = [5, 1, 9, 3, 3, 7, 2, 4, 6, 8]  # interaction counts per item id of the tiny catalogue (ids 3, 4 share a title)


def _train_checkpoint(out, init_dir, tokenizer, titles, flow_lambda):
    """A 2-step FlowerTrainer run from `init_dir`, saved to `out` (λ = 0: the SFT twin; same rows, steps and seed)."""
    from datasets import Dataset

    from trl_flower.config import FlowerConfig
    from trl_flower.trainer import FlowerTrainer

    tree = PrefixTree.from_titles(titles, tokenizer, item_rewards=COUNTS)
    rows = Dataset.from_dict(
        {"prompt": [PROMPT.format(titles[(i + 1) % 10]) for i in range(8)], "item_id": [(i + 2) % 10 for i in range(8)]}
    )
    args = FlowerConfig(
        str(out),
        flow_lambda=flow_lambda,
        max_completion_length=int(tree.item_length.max()),
        **{k: v for k, v in TINY_ARGS.items() if k != "gradient_checkpointing"},
    )
    trainer = FlowerTrainer(model=str(init_dir), tree=tree, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    return out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer, tiny_titles):
    """A `trl-flower-demo`-like directory with a real Flower checkpoint (λ = 0.5) and its SFT twin (λ = 0)."""
    root = tmp_path_factory.mktemp("chain") / "trl-flower-demo"
    for name, lam in (("flower", 0.5), ("sft", 0.0)):
        _train_checkpoint(root / name, tiny_model_dir, tiny_tokenizer, tiny_titles, lam)
    return root


@pytest.fixture(scope="module")
def flower_checkpoint(demo_dir):
    """The Flower checkpoint: a plain HF directory (model, tokenizer, chat template) plus the saved prefix tree."""
    return demo_dir / "flower"


@pytest.fixture(scope="module")
def init_dir(demo_dir):
    """Another policy init (the SFT twin), for reference != policy init."""
    return demo_dir / "sft"


@pytest.fixture(scope="module")
def tree(flower_checkpoint):
    return checkpoint.load_tree(flower_checkpoint)


@pytest.fixture(scope="module")
def prompts(tiny_titles):
    return [PROMPT.format(", ".join(tiny_titles[i : i + 2])) for i in range(0, 8)]


def _same_weights(model_a, model_b) -> bool:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _unwrapped(trainer, model):
    return trainer.accelerator.unwrap_model(model)


# ------------------------------------------------------------------------------------------------------- helpers


def test_flower_checkpoint_is_a_plain_model_dir_with_its_tree(flower_checkpoint, init_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(flower_checkpoint).chat_template
    info = checkpoint.read_record(flower_checkpoint)
    assert info["flow_lambda"] == 0.5 and info["tree_file"] == checkpoint.TREE_FILE
    assert checkpoint.load_tree(flower_checkpoint).item_rewards.tolist() == COUNTS
    dirs = (flower_checkpoint, init_dir, tiny_model_dir)
    flower, sft, start = (AutoModelForCausalLM.from_pretrained(d) for d in dirs)
    assert not _same_weights(flower, start) and not _same_weights(flower, sft)


def test_load_reference_policy_is_frozen_and_equal(flower_checkpoint):
    from transformers import AutoModelForCausalLM

    ref = load_reference_policy(flower_checkpoint)
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert _same_weights(ref, AutoModelForCausalLM.from_pretrained(flower_checkpoint))
    assert load_reference_policy(flower_checkpoint, dtype="bfloat16").dtype == torch.bfloat16


def test_load_reference_policy_rejects_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        load_reference_policy(tmp_path)


def test_tree_reward_scorer_follows_ppo_get_reward_contract(tree, tiny_tokenizer, tiny_titles):
    """Rewards land at the last response token; responses are cut at the first pad; invalid ones get the floor."""
    reward = PrefixTreeRewardModel(tree, sequence_reward="raw", invalid_reward=-1.0)
    scorer = TreeRewardScorer(reward, pad_token_id=tiny_tokenizer.pad_token_id)
    pad, eos = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    query = [7, 8, 9]  # any context; P = 3
    responses = [
        tiny_tokenizer.encode(tiny_titles[2], add_special_tokens=False) + [eos],  # "The Red River", R = 9
        tiny_tokenizer.encode(tiny_titles[3], add_special_tokens=False) + [eos],  # "Blue Train" (ids 3, 4): 3 + 3
        tiny_tokenizer.encode("Blue", add_special_tokens=False) + [eos],  # not an item
    ]
    R = max(map(len, responses))
    rows = torch.tensor([query + r + [pad] * (R - len(r)) for r in responses])  # [3, P + R]
    logits, final, end = scorer.get_reward(rows, pad, context_length=3)
    assert final.tolist() == [9.0, 6.0, -1.0]
    assert end.tolist() == [3 + len(r) - 1 for r in responses]
    assert logits.shape == (3, rows.shape[1], 1)
    assert logits[torch.arange(3), end, 0].tolist() == final.tolist()
    assert logits.abs().sum().item() == pytest.approx(final.abs().sum().item())


def test_tree_reward_scorer_rejects_personalised_reward(tree):
    reward = PrefixTreeRewardModel(tree, variant="div_s", preference_scores=torch.zeros(4, tree.num_items))
    with pytest.raises(ValueError, match="personalised"):
        TreeRewardScorer(reward, pad_token_id=0)


def test_constrained_rollout_returns_unmasked_logits(flower_checkpoint, tree, tiny_tokenizer, prompts):
    """PPO's rollout logits must be the raw logits / T (not the trie-masked scores), and rollouts stay on the tree."""
    from transformers import GenerationConfig

    from trl_flower.decoding import generated_nodes

    model = load_reference_policy(flower_checkpoint)
    enc = tiny_tokenizer(prompts[:4], padding=True, add_special_tokens=False, return_tensors="pt")
    queries = enc["input_ids"]  # [4, P] left-padded with pad
    config = GenerationConfig(
        max_new_tokens=8,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        do_sample=True,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    query_responses, logits = _constrained_generate(model, queries, tiny_tokenizer.pad_token_id, config, tree)
    P = queries.shape[1]
    responses = query_responses[:, P:]  # [4, R]
    nodes, off_at = generated_nodes(tree, responses)
    assert (off_at < 0).all() and tree.tensors().is_terminal[nodes].all()  # every rollout is a complete item
    assert torch.isfinite(logits).all()  # unmasked
    # the rollout logits equal a teacher-forced forward's logits / T on the generated tokens (PPO's re-score)
    mask = query_responses != tiny_tokenizer.pad_token_id
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask, position_ids=pos).logits
    rescored = full[:, P - 1 : -1] / 0.7  # [4, R, V]
    first = rescored[:, 0]
    assert torch.allclose(logits[:, 0], first, atol=1e-4)
    live = responses != tiny_tokenizer.pad_token_id  # [4, R] tokens before padding
    assert torch.allclose(logits[live], rescored[live], atol=1e-4)


# ------------------------------------------------------------------------------------------------------- DPO


def _dpo_dataset(prompts, tiny_titles):
    from datasets import Dataset

    chosen = [tiny_titles[(i + 2) % len(tiny_titles)] for i in range(len(prompts))]
    rejected = [tiny_titles[(i + 5) % len(tiny_titles)] for i in range(len(prompts))]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


@pytest.mark.parametrize("policy_init", ["flower", "other"])
def test_dpo_with_flower_reference(
    policy_init, flower_checkpoint, init_dir, prompts, tiny_titles, tiny_tokenizer, tmp_path
):
    """DPO: reference = Flower, policy init = Flower (auto reference) or another model (explicit ref_model)."""
    from trl import DPOConfig, DPOTrainer

    flower_ref = load_reference_policy(flower_checkpoint)
    kwargs = {} if policy_init == "flower" else {"ref_model": load_reference_policy(flower_checkpoint)}
    model = str(flower_checkpoint if policy_init == "flower" else init_dir)
    args = DPOConfig(output_dir=str(tmp_path), max_length=96, **TINY_ARGS)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=_dpo_dataset(prompts, tiny_titles),
        processing_class=tiny_tokenizer,
        **kwargs,
    )
    assert _same_weights(_unwrapped(trainer, trainer.ref_model), flower_ref)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = _logged(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if policy_init == "flower":  # policy == reference at step 1: every margin is 0, loss = log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    else:
        assert abs(losses[0] - math.log(2)) > 1e-4
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert _same_weights(_unwrapped(trainer, trainer.ref_model), flower_ref)  # the reference never moves


# ------------------------------------------------------------------------------------------------------- GRPO / RLOO


def _online_trainer(kind, model, tree, tiny_tokenizer, prompts, tmp_path):
    from datasets import Dataset

    reward = PrefixTreeRewardModel(tree, tokenizer=tiny_tokenizer)
    common = dict(output_dir=str(tmp_path), num_generations=2, max_completion_length=8, beta=0.05, **TINY_ARGS)
    dataset = Dataset.from_dict({"prompt": prompts})
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=RLOOConfig(**common),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_online_rl_from_flower_checkpoint(kind, flower_checkpoint, tree, tiny_tokenizer, prompts, tmp_path):
    """GRPO/RLOO with beta > 0 from the Flower checkpoint: TRL reloads it as the reference; the tree is the reward."""
    trainer = _online_trainer(kind, str(flower_checkpoint), tree, tiny_tokenizer, prompts, tmp_path)
    flower_ref = load_reference_policy(flower_checkpoint)
    assert _same_weights(_unwrapped(trainer, trainer.ref_model), flower_ref)
    trainer.train()
    kl = _logged(trainer, "kl")
    rewards = _logged(trainer, "rewards/prefix_tree_reward/mean")
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    assert _same_weights(_unwrapped(trainer, trainer.ref_model), flower_ref)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_set_reference_policy_other_init(kind, flower_checkpoint, init_dir, tree, tiny_tokenizer, prompts, tmp_path):
    """Policy init != reference: set_reference_policy swaps TRL's reference for the Flower checkpoint (KL > 0)."""
    trainer = _online_trainer(kind, str(init_dir), tree, tiny_tokenizer, prompts, tmp_path)
    assert not _same_weights(_unwrapped(trainer, trainer.ref_model), load_reference_policy(flower_checkpoint))
    assert set_reference_policy(trainer, flower_checkpoint) is trainer
    assert _same_weights(_unwrapped(trainer, trainer.ref_model), load_reference_policy(flower_checkpoint))
    trainer.train()
    kl = _logged(trainer, "kl")
    assert len(kl) == 2 and kl[0] > 1e-4


def test_set_reference_policy_errors(flower_checkpoint, tree, tiny_tokenizer, prompts, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=8, beta=0.0, **TINY_ARGS)
    trainer = GRPOTrainer(
        model=str(flower_checkpoint),
        reward_funcs=PrefixTreeRewardModel(tree),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tiny_tokenizer,
    )
    with pytest.raises(ValueError, match="beta=0.0"):
        set_reference_policy(trainer, flower_checkpoint)
    with pytest.raises(ValueError, match="expects a GRPOTrainer or RLOOTrainer"):
        set_reference_policy(object(), flower_checkpoint)


# ------------------------------------------------------------------------------------------------------- PPO


@pytest.mark.skipif(HAS_PPO, reason=f"trl {trl.__version__} has experimental PPO; covered by the trl112 test")
def test_ppo_entry_point_fails_clearly_on_new_trl():
    from trl_flower.chain import make_ppo_trainer

    with pytest.raises(PPOUnavailableError) as info:
        require_ppo()
    message = str(info.value)
    for needle in (trl.__version__, "1.11.x", "1.12.x", "trl==1.12.0", "RLOOTrainer", "GRPOTrainer", "beta > 0"):
        assert needle in message
    with pytest.raises(PPOUnavailableError):
        make_ppo_trainer(None, model="unused", ref_model="unused", reward=None, train_dataset=None)


@pytest.mark.trl112
@pytest.mark.skipif(
    not HAS_PPO,
    reason=f"PPO lives in trl.experimental.ppo of trl 1.11/1.12 only, installed: {trl.__version__}; run "
    "`/work/venv112/bin/python -m pytest -m trl112 tests/test_chain.py` in the trl 1.12.0 environment",
)
def test_ppo_with_flower_reference_and_tree_reward(flower_checkpoint, tree, tiny_tokenizer, prompts, tmp_path):
    """PPO (trl 1.11/1.12): ref_model = Flower, reward = the tree, rollouts constrained, importance ratio 1 at start."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig

    from trl_flower.chain import make_ppo_trainer

    reward = PrefixTreeRewardModel(tree, invalid_reward=-1.0)  # minmax reward in [0, 1]; -1 flags an invalid title
    args = PPOConfig(
        output_dir=str(tmp_path),
        stop_token="eos",
        response_length=8,
        total_episodes=8,  # 2 PPO updates of batch 4
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=4,
        num_sample_generations=0,
        missing_eos_penalty=None,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        learning_rate=1e-3,
        seed=0,
    )
    trainer = make_ppo_trainer(
        args,
        model=str(flower_checkpoint),
        ref_model=str(flower_checkpoint),
        reward=reward,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tiny_tokenizer,
    )
    flower_ref = load_reference_policy(flower_checkpoint)
    assert _same_weights(trainer.ref_model, flower_ref)
    before = {k: v.clone() for k, v in trainer.policy_model.named_parameters()}
    trainer.train()
    scores = _logged(trainer, "objective/scores")
    ratio = _logged(trainer, "val/ratio")
    approxkl = _logged(trainer, "policy/approxkl_avg")
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)  # no invalid (-1) completion
    assert ratio[0] == pytest.approx(1.0, abs=1e-3)  # unmasked rollout log-probs: no spurious ratio collapse
    assert approxkl[0] < 1e-3
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy_model.named_parameters())
    assert _same_weights(trainer.ref_model, flower_ref)


@pytest.mark.trl112
@pytest.mark.skipif(not HAS_PPO, reason=f"needs trl 1.11/1.12 (experimental PPO), installed: {trl.__version__}")
def test_ppo_hooks_leave_other_models_to_trl(tiny_model_dir):
    """The wrapped get_reward/generate dispatch only for models registered by make_ppo_trainer."""
    from transformers import AutoModelForSequenceClassification

    ppo_module = require_ppo()
    from trl_flower.chain import _install_ppo_hooks

    _install_ppo_hooks(ppo_module)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rows = torch.tensor([[5, 6, 7, 8, 0]])
    logits, final, end = ppo_module.get_reward(value, rows, pad_token_id=0, context_length=2)
    assert logits.shape == (1, 5, 1) and end.tolist() == [3]


# ------------------------------------------------------------------------------------------------------- docs


def test_docs_chaining_page_runs(demo_dir, monkeypatch):
    """Run docs/chaining.md's ```python blocks in order from a directory holding `trl-flower-demo/{flower,sft}`;
    a `print(...)` line followed by `# ` comment lines must print exactly those lines. The PPO block trains only on
    trl 1.11/1.12 (it checks the version itself)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "chaining.md"
    monkeypatch.chdir(demo_dir.parent)
    namespace: dict = {}
    checked = 0
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    for block in blocks:
        expected = [c.replace("# ", "", 1) for c in re.findall(r"^print\(.*\n(# .*)$", block, re.M)]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(block, str(page), "exec"), namespace)
        # Trainer log dicts and PPO's "===training policy===" banner are not the page's output
        printed = [line for line in buffer.getvalue().splitlines() if not line.startswith(("{", "==="))]
        assert printed == expected
        checked += len(expected)
    assert len(blocks) == 5 and checked == 3
    assert ("trainer" in namespace) and namespace["trainer"].state.global_step == 2
