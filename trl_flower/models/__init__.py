"""Real pretrained models that install from a package registry (no model hub needed)."""

from trl_flower.models.smollm2 import (
    GGUF_NAME,
    INSTALL_HINT,
    SmolLM2NotInstalledError,
    find_gguf,
    load_smollm2,
    smollm2_lora_config,
    smollm2_path,
)

__all__ = [
    "GGUF_NAME",
    "INSTALL_HINT",
    "SmolLM2NotInstalledError",
    "find_gguf",
    "load_smollm2",
    "smollm2_lora_config",
    "smollm2_path",
]
