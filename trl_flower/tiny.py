"""Tiny, locally built causal LMs for tests, the demo and quick experiments (no model hub needed).

A byte-level BPE tokenizer is trained in milliseconds on the catalogue's own text, and a small `Qwen2` or `Llama`
model is initialised around it. Models must be *saved to disk* before they are handed to TRL trainers, because TRL
reloads reference models from `config._name_or_path`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a transformers fast tokenizer.

    Args:
        corpus: lines of text (item titles, prompt text) to learn merges from.
        vocab_size: target vocabulary size including the 256 byte symbols and the 4 special tokens.

    Returns:
        A `PreTrainedTokenizerFast` with pad `<|pad|>`, eos `<|im_end|>` (pad != eos, as PPO and GRPO need), a
        ChatML chat template and left padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, arch: str = "qwen2", seed: int = 0):
    """A randomly initialised causal LM sized for CPU tests (about 0.1 M parameters at the defaults).

    Args:
        tokenizer: the tokenizer whose vocabulary, pad and eos ids the model uses.
        hidden_size: model width; intermediate size is twice this.
        num_layers: number of decoder layers.
        arch: ``"qwen2"`` or ``"llama"``.
        seed: torch seed for the initial weights (so tests are reproducible).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return model


def save_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    arch: str = "qwen2",
    seed: int = 0,
) -> Path:
    """Build a tokenizer and a tiny model from `corpus` and save both to `out_dir` (a plain HF model directory)."""
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, arch=arch, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
