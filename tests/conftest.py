"""Shared fixtures: a tiny catalogue, a tokenizer trained on it, a tiny causal LM saved to disk, the shared data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A small catalogue with the awkward cases: a title that is a prefix of another ("Back to Life" / "Back to Life
# Again"), a duplicate title (ids 3 and 4), punctuation endings and a long title.
TINY_TITLES = [
    "Back to Life",
    "Back to Life Again",
    "The Red River",
    "Blue Train",
    "Blue Train",
    "Kind of Blue",
    "Abbey Road (Remastered)",
    "Rumours.",
    "The Dark Side of the Moon",
    "A Love Supreme!",
]


def shared_data_dir() -> Path:
    """The reference data directory: $TRL_FLOWER_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("TRL_FLOWER_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Path to the shared real data; tests that need it are skipped with a clear reason when it is absent."""
    path = shared_data_dir()
    if not (path / "amazon").is_dir():
        pytest.skip(f"shared data not found at {path} (set TRL_FLOWER_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_titles() -> list[str]:
    """The tiny catalogue's titles (item id = list index)."""
    return list(TINY_TITLES)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_titles):
    """A byte-level BPE tokenizer trained on the tiny catalogue plus some prompt text."""
    from trl_flower.tiny import build_tokenizer

    corpus = tiny_titles * 20 + ["The user has enjoyed the following items before:", "Recommend the next item."] * 20
    return build_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Qwen2 model and its tokenizer saved as a plain Hugging Face directory."""
    from trl_flower.tiny import build_model

    out = tmp_path_factory.mktemp("tiny-model")
    model = build_model(tiny_tokenizer)
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _trl_has_ppo() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("trl").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) in {(1, 11), (1, 12)}


def pytest_collection_modifyitems(config, items):
    """Tests marked `trl112` need trl 1.11/1.12 (experimental PPO); skip them, with the reason, elsewhere."""
    if _trl_has_ppo():
        return
    skip = pytest.mark.skip(reason="needs trl 1.11 or 1.12 (experimental PPO); run in the trl112 compatibility job")
    for item in items:
        if "trl112" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def baseline_checkpoints(tmp_path_factory, tiny_model_dir, tiny_tokenizer, tiny_titles) -> dict[str, Path]:
    """Two saved runs to start baselines from: "flower" (λ = 0.5) and its SFT twin "sft" (λ = 0); see baseline_setup."""
    from baseline_setup import save_checkpoint

    root = tmp_path_factory.mktemp("baseline-checkpoints")
    return {
        name: save_checkpoint(root / name, tiny_model_dir, tiny_tokenizer, tiny_titles, lam)
        for name, lam in (("flower", 0.5), ("sft", 0.0))
    }
