"""One FlowerTrainer run for tests/test_distributed.py: `python` or `accelerate launch` this file with a spec JSON.

The spec (written by the test) holds the tiny model directory, the catalogue titles and item rewards, the dataset
rows, the FlowerConfig keyword arguments and the output directory. Every rank writes what it sampled (row index,
decoded completion, item id, validity) to ``samples_rank{r}.json``; rank 0 writes the log history to
``log_history.json``; with ``"save": true`` the model is saved to ``<out>/model``.

Sampling identical across world sizes ("sampler": "gumbel"): GRPO samples every process's rows with that process's
torch RNG, so 1 and 2 processes draw different items for the same row. Here generation runs greedily
(``generation_kwargs={"do_sample": False}``) on trie-masked logits plus Gumbel noise drawn from a generator seeded by
(the row's tokens so far, the global step). argmax(log π + G) is an exact sample from π (Gumbel-max trick), and the
noise depends only on the row, not on which process or batch position holds it.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path


class GumbelPerRow:
    """Logits processor: add Gumbel(0, 1) noise seeded by each row's own non-pad tokens and a step counter."""

    def __init__(self, pad_token_id: int, step: int):
        self.pad_token_id = pad_token_id
        self.step = step

    def __call__(self, input_ids, scores):
        import numpy as np
        import torch

        noise = torch.empty_like(scores)  # [B, V]
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][input_ids[b] != self.pad_token_id].cpu().numpy().astype(np.int64)
            seed = zlib.crc32(ids.tobytes() + f"|{self.step}".encode())
            gen = torch.Generator().manual_seed(seed)
            u = torch.rand(scores.shape[1], generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)  # [V]
            noise[b] = (-torch.log(-torch.log(u))).to(scores.dtype)
        return scores + noise


class _Chain:
    def __init__(self, *processors):
        self.processors = processors

    def __call__(self, input_ids, scores):
        for p in self.processors:
            scores = p(input_ids, scores)
        return scores


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)

    from trl_flower.distributed import finish_distributed, prepare_cpu_distributed

    config_kwargs = prepare_cpu_distributed(spec["config"])  # before anything builds a PartialState

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_flower import FlowerConfig, FlowerTrainer
    from trl_flower.tree import PrefixTree

    torch.set_num_threads(1)
    gumbel = spec.get("sampler") == "gumbel"
    if gumbel:
        config_kwargs["generation_kwargs"] = {"do_sample": False}
    args = FlowerConfig(**config_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    titles = spec["titles"]
    tree = PrefixTree.from_titles(titles, tokenizer, item_rewards=spec["counts"])
    records: list[dict] = []

    class RecordingTrainer(FlowerTrainer):
        def rollout_logits_processor(self, prompt_length=None):
            # the one rollout hook (trl_flower.rollout): the trie processor, then per-row Gumbel noise
            trie = super().rollout_logits_processor(prompt_length)
            if not gumbel:
                return trie
            return _Chain(trie, GumbelPerRow(tokenizer.pad_token_id, self.state.global_step))

        def _generate_and_score_completions(self, inputs):
            # GRPO's generate path (do_sample=False disables FlowerTrainer's in-loss-step sampler): the batch holds
            # this process's completions; record them with their rows (public reward-model API only).
            batch = super()._generate_and_score_completions(inputs)
            completion_ids = batch["completion_ids"]
            targets = self.reward_model.token_targets(completion_ids)
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            for x, text, item, valid in zip(inputs, texts, targets.item_ids.tolist(), targets.valid.tolist()):
                records.append(
                    {
                        "step": self.state.global_step,
                        "row": int(x["row_index"]),
                        "text": text,
                        "item": item,
                        "valid": bool(valid),
                    }
                )
            return batch

    trainer = RecordingTrainer(
        spec["model_dir"], tree, args=args, train_dataset=Dataset.from_list(spec["rows"]), processing_class=tokenizer
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    info = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "samples": records,
    }
    (out / f"samples_rank{rank}.json").write_text(json.dumps(info))
    if spec.get("save"):
        trainer.save_model(str(out / "model"))
    if trainer.accelerator.is_main_process:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
