"""RQ1 target distributions: {title: count} JSON files (the paper's ``movies_popularity/movies_{100,1500}.json``).

`trl-flower evaluate --task distribution --target <file or name>` fits a model's history-free samples to one of them
(flower_reference.md §3.3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trl_flower.data.amazon import default_data_root

__all__ = ["TARGET_DIR", "load_target"]

TARGET_DIR = "movies_popularity"  # <data root>/movies_popularity/<name>.json: the RQ1 targets


def load_target(target: str | os.PathLike, data_root: str | os.PathLike | None = None) -> tuple[Path, dict[str, float]]:
    """Read a {title: count} target distribution from a path, or by name from ``<data root>/movies_popularity/``.

    Args:
        target: a JSON file path, or the name of one in the data root's ``movies_popularity`` folder (with or without
            ``.json``: ``movies_100``, ``movies_1500.json``).
        data_root: the data root (default: `default_data_root`).

    Returns:
        ``(path, {title: count})`` with float counts, in the file's order.
    """
    path = Path(target).expanduser()
    if not path.is_file() and len(path.parts) == 1:
        root = Path(data_root).expanduser() if data_root else default_data_root()
        candidates = [root / TARGET_DIR / target, root / TARGET_DIR / f"{target}.json"]
        path = next((p for p in candidates if p.is_file()), path)
        if not path.is_file():
            available = sorted(p.name for p in (root / TARGET_DIR).glob("*.json"))
            raise FileNotFoundError(
                f"--target {target}: no such file, nor in {root / TARGET_DIR} (available: {available or 'none'})"
            )
    if not path.is_file():
        raise FileNotFoundError(f"--target {target}: no such file")
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--target {path}: not valid JSON ({err})") from None
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"--target {path}: expected a non-empty JSON object {{title: count}}")
    bad = [k for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
    if bad:
        raise ValueError(f"--target {path}: counts must be positive numbers; {bad[0]!r} has {counts[bad[0]]!r}")
    return path, {str(k): float(v) for k, v in counts.items()}
