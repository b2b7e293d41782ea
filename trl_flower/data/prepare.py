"""Raw Amazon Review Data (2018) -> the splits the loader reads (``items.tsv`` + ``train/valid/test.csv``).

Inputs are the two per-category files of the 2018 release: ``<Category>.json.gz`` (one review per line, with
``reviewerID``, ``asin``, ``unixReviewTime``; other fields such as ``overall`` are ignored) and
``meta_<Category>.json.gz`` (one product per line, with ``asin`` and ``title``). Uncompressed ``.json`` works too.

Steps (the paper's preprocessing, flower_reference.md §5):

1. **Titles** (meta file): HTML-unescape once, turn tabs/newlines into spaces (``items.tsv`` is tab-separated), strip
   spaces and double quotes at both ends; keep titles longer than 1 character and of at most 20 words. The first line
   of a duplicated ``asin`` wins.
2. **Reviews** whose item has a kept title and whose time lies in ``[start, end)`` (dates at 00:00 UTC). Defaults:
   CDs_and_Vinyl and Video_Games 2015-10-01..2018-11-01, Movies_and_TV 2017-10-01..2018-11-01. Repeated reviews of
   one item by one user are kept (the shared data has them too).
3. **Iterative k-core** (k = 5): drop users and items with fewer than k interactions until none is left.
4. **Sequences**: each user's interactions sorted by time (ties: file order). Every interaction after the user's
   first becomes one row: history = the previous ≤ 10 items (oldest first), target = this item.
5. **Order and split**: rows sorted by target time, stable (ties: users in order of first appearance in the review
   file, then sequence order); chronological split ``train = rows[:int(0.8 N)]``,
   ``valid = rows[int(0.8 N):int(0.9 N)]``, ``test = rows[int(0.9 N):]``.
6. **Item ids**: the kept ``asin`` strings sorted, then shuffled with ``random.Random(seed)`` (seed 42); the id is the
   position. The official code also shuffles with seed 42 but its starting order is unknown, so ids (not item sets,
   rows or titles) can differ from the published files.

Malformed lines (bad JSON or UTF-8, not an object, a missing or wrongly typed field) are skipped and counted per
reason together with their first line numbers; so are lines dropped by a filter. The summary is returned, written to
``stats.json`` and printed. A file that cannot be read at all (truncated gzip) raises an error naming the file and
the last line read.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import random
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEFAULT_WINDOWS: dict[str, tuple[str, str]] = {
    "CDs_and_Vinyl": ("2015-10-01", "2018-11-01"),
    "Video_Games": ("2015-10-01", "2018-11-01"),
    "Movies_and_TV": ("2017-10-01", "2018-11-01"),
}
"""Category -> (start, end) of the paper's time windows; end is exclusive."""

MIN_TITLE_CHARS = 2
MAX_TITLE_WORDS = 20
SPLIT_FRACTIONS = (0.8, 0.9)
MAX_EXAMPLES = 5  # line numbers kept per skip reason


@dataclass
class SkipLog:
    """Lines skipped or dropped, per ``"<file>:<reason>"``, with the first few line numbers of each."""

    counts: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, line_no: int) -> None:
        """Count one line under ``reason``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < MAX_EXAMPLES:
            lines.append(line_no)

    def as_dict(self) -> dict[str, dict]:
        """``reason -> {"count": n, "first_lines": [...]}``, sorted by reason."""
        return {r: {"count": self.counts[r], "first_lines": self.first_lines[r]} for r in sorted(self.counts)}


def clean_title(raw: str) -> str:
    """HTML-unescape, replace tabs/newlines by spaces, strip spaces and double quotes at both ends.

    Example:
        >>> clean_title('  "Kind of Blue &amp; More"\\n')
        'Kind of Blue & More'
    """
    text = html.unescape(raw)
    text = text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    return text.strip(' "')


def _title_problem(title: str) -> str | None:
    if len(title) < MIN_TITLE_CHARS:
        return "title_too_short"
    if len(title.split()) > MAX_TITLE_WORDS:
        return "title_too_long"
    return None


def _parse_date(value: str, name: str) -> int:
    try:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a date; use YYYY-MM-DD, e.g. 2015-10-01") from None
    return int(day.timestamp())


def _read_lines(path: Path, progress: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped bytes) of a .json or .json.gz file; unreadable files raise with context."""
    from tqdm import tqdm

    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line in tqdm(f, desc=path.name, unit=" lines", unit_scale=True, disable=not progress, leave=False):
                line_no += 1
                yield line_no, line.strip()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"{path}: cannot read past line {line_no} ({type(err).__name__}: {err}); the file is truncated or not "
            "gzip/JSON-lines; download it again"
        ) from err


def _parse_record(line: bytes, line_no: int, skipped: SkipLog, prefix: str) -> dict | None:
    if not line:
        skipped.add(f"{prefix}:blank_line", line_no)
        return None
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        skipped.add(f"{prefix}:bad_utf8", line_no)
        return None
    except json.JSONDecodeError:
        skipped.add(f"{prefix}:bad_json", line_no)
        return None
    if not isinstance(record, dict):
        skipped.add(f"{prefix}:not_an_object", line_no)
        return None
    return record


def _string_field(record: dict, name: str, line_no: int, skipped: SkipLog, prefix: str) -> str | None:
    value = record.get(name)
    if value is None:
        skipped.add(f"{prefix}:missing_{name}", line_no)
        return None
    if not isinstance(value, str) or not value.strip():
        skipped.add(f"{prefix}:bad_{name}", line_no)
        return None
    return value


def read_meta(path: str | Path, skipped: SkipLog, progress: bool = True) -> dict[str, str]:
    """asin -> cleaned title for every product line with a usable title (see the module doc, step 1)."""
    titles: dict[str, str] = {}
    for line_no, line in _read_lines(Path(path), progress):
        record = _parse_record(line, line_no, skipped, "meta")
        if record is None:
            continue
        asin = _string_field(record, "asin", line_no, skipped, "meta")
        if asin is None:
            continue
        raw = record.get("title")
        if raw is None or raw == "":
            skipped.add("meta:no_title", line_no)
            continue
        if not isinstance(raw, str):
            skipped.add("meta:bad_title", line_no)
            continue
        title = clean_title(raw)
        problem = _title_problem(title)
        if problem:
            skipped.add(f"meta:{problem}", line_no)
            continue
        if asin in titles:
            skipped.add("meta:duplicate_asin", line_no)
            continue
        titles[asin] = title
    return titles


@dataclass
class Interactions:
    """Reviews kept after the title and time filters, as parallel arrays (user/item are dense ints)."""

    users: list[str]
    items: list[str]
    user: np.ndarray  # [N] int64, users in order of first appearance
    item: np.ndarray  # [N] int64
    time: np.ndarray  # [N] int64, unix seconds
    line: np.ndarray  # [N] int64, review-file line (tie-break)


def read_reviews(
    path: str | Path,
    titles: dict[str, str],
    start: int,
    end: int,
    skipped: SkipLog,
    progress: bool = True,
) -> Interactions:
    """Reviews of titled items with ``start <= unixReviewTime < end`` (module doc, step 2)."""
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    user, item, time, lines = array("q"), array("q"), array("q"), array("q")
    for line_no, line in _read_lines(Path(path), progress):
        record = _parse_record(line, line_no, skipped, "reviews")
        if record is None:
            continue
        reviewer = _string_field(record, "reviewerID", line_no, skipped, "reviews")
        asin = _string_field(record, "asin", line_no, skipped, "reviews") if reviewer is not None else None
        if reviewer is None or asin is None:
            continue
        stamp = record.get("unixReviewTime")
        if stamp is None:
            skipped.add("reviews:missing_unixReviewTime", line_no)
            continue
        try:
            if isinstance(stamp, bool) or (isinstance(stamp, float) and not stamp.is_integer()):
                raise ValueError
            stamp = int(stamp)
        except (TypeError, ValueError):
            skipped.add("reviews:bad_unixReviewTime", line_no)
            continue
        if asin not in titles:
            skipped.add("reviews:item_without_title", line_no)
            continue
        if not start <= stamp < end:
            skipped.add("reviews:outside_time_window", line_no)
            continue
        user.append(user_ids.setdefault(reviewer, len(user_ids)))
        item.append(item_ids.setdefault(asin, len(item_ids)))
        time.append(stamp)
        lines.append(line_no)
    return Interactions(
        users=list(user_ids),
        items=list(item_ids),
        user=np.frombuffer(user, dtype=np.int64).copy(),
        item=np.frombuffer(item, dtype=np.int64).copy(),
        time=np.frombuffer(time, dtype=np.int64).copy(),
        line=np.frombuffer(lines, dtype=np.int64).copy(),
    )


def k_core_mask(user: np.ndarray, item: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: a mask of the interactions whose user and item both keep >= k interactions.

    Returns:
        ``(keep, iterations)``: boolean [N] mask and the number of filtering rounds.
    """
    keep = np.ones(user.size, dtype=bool)  # [N]
    rounds = 0
    while True:
        rounds += 1
        per_user = np.bincount(user[keep], minlength=user.max(initial=-1) + 1)  # [n_users]
        per_item = np.bincount(item[keep], minlength=item.max(initial=-1) + 1)  # [n_items]
        drop = keep & ((per_user[user] < k) | (per_item[item] < k))  # [N]
        if not drop.any():
            return keep, rounds
        keep &= ~drop


def build_rows(
    user: np.ndarray, item: np.ndarray, time: np.ndarray, line: np.ndarray, max_history: int
) -> list[tuple[list[int], int]]:
    """Sequence rows ``(history item indices, target item index)`` sorted by target time (module doc, steps 4-5)."""
    if user.size == 0:
        return []
    order = np.lexsort((line, time, user))  # [N] by user, then time, then file line
    u, it, t = user[order], item[order], time[order]
    is_row = np.r_[False, u[1:] == u[:-1]]  # [N] every interaction after the user's first
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])  # [n_users] segment start positions
    seg_start = starts[np.cumsum(np.r_[True, u[1:] != u[:-1]]) - 1]  # [N] start of each position's segment
    pos = np.flatnonzero(is_row)  # [R] positions of targets
    pos = pos[np.argsort(t[pos], kind="stable")]  # [R] by target time; ties keep user, then sequence order
    seq = it.tolist()
    first = np.maximum(seg_start[pos], pos - max_history).tolist()
    return [(seq[a:p], seq[p]) for a, p in zip(first, pos.tolist())]


def split_rows(rows: Sequence, fractions: tuple[float, float] = SPLIT_FRACTIONS) -> dict[str, list]:
    """Chronological split: ``rows[:int(0.8 N)]``, ``rows[int(0.8 N):int(0.9 N)]``, the rest."""
    n = len(rows)
    a, b = int(fractions[0] * n), int(fractions[1] * n)
    return {"train": list(rows[:a]), "valid": list(rows[a:b]), "test": list(rows[b:])}


def shuffled_item_ids(asins: Sequence[str], seed: int) -> dict[str, int]:
    """asin -> item id: sorted asins shuffled with ``random.Random(seed)``."""
    order = sorted(asins)
    random.Random(seed).shuffle(order)
    return {asin: i for i, asin in enumerate(order)}


def write_dataset(out_dir: str | Path, items: Sequence[str], splits: dict[str, list[tuple[list[int], int]]]) -> None:
    """Write ``items.tsv`` and ``<split>.csv`` in the shared format from rows of (history ids, target id).

    CSV: header ``history_item_id,history_item_title,item_id,item_title``, list columns as JSON (``json.dumps``),
    Python `csv` defaults (minimal quoting, CRLF line ends). ``items.tsv``: ``item_id<TAB>title``, LF line ends.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.tsv").open("w", encoding="utf-8", newline="") as f:
        f.write("item_id\ttitle\n")
        f.writelines(f"{i}\t{title}\n" for i, title in enumerate(items))
    quoted = [json.dumps(title, ensure_ascii=False) for title in items]  # JSON string of each title, encoded once
    for name, rows in splits.items():
        with (out / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            writer.writerows(
                # "[" + ", ".join(...) + "]" is exactly json.dumps(list) with its default separators
                [
                    "[" + ", ".join(map(str, history)) + "]",
                    "[" + ", ".join([quoted[i] for i in history]) + "]",
                    target,
                    items[target],
                ]  # fmt: skip
                for history, target in rows
            )


def format_summary(stats: dict) -> str:
    """A short human-readable summary of `prepare_amazon`'s statistics (counts, splits, skipped lines)."""
    rows = stats["rows"]
    lines = [
        f"{stats['category']}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions",
        f"rows: train {rows['train']}, valid {rows['valid']}, test {rows['test']}",
        f"window [{stats['window']['start']}, {stats['window']['end']}) UTC; {stats['k_core']}-core in "
        f"{stats['k_core_rounds']} rounds",
    ]
    if stats["skipped"]:
        lines.append("skipped or dropped lines (reason: count, first line numbers):")
        for reason, info in stats["skipped"].items():
            lines.append(f"  {reason}: {info['count']} (lines {', '.join(map(str, info['first_lines']))})")
    return "\n".join(lines)


def prepare_amazon(
    reviews: str | Path,
    meta: str | Path,
    output_dir: str | Path,
    *,
    category: str | None = None,
    start: str | None = None,
    end: str | None = None,
    k_core: int = 5,
    max_history: int = 10,
    seed: int = 42,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Turn raw Amazon 2018 review + meta files into ``items.tsv``, ``train/valid/test.csv`` and ``stats.json``.

    Args:
        reviews: ``<Category>.json.gz`` (review lines).
        meta: ``meta_<Category>.json.gz`` (product lines).
        output_dir: where the dataset directory is written (created if needed).
        category: the category name (default: the reviews file name without ``.json[.gz]``); picks the default time
            window and goes into ``stats.json`` and ``README.md``.
        start: first day kept, ``YYYY-MM-DD`` (inclusive, 00:00 UTC); default from `DEFAULT_WINDOWS`.
        end: first day no longer kept (exclusive); default from `DEFAULT_WINDOWS`.
        k_core: minimum interactions per user and per item (iterated to a fixed point).
        max_history: maximum history length per row.
        seed: seed of the item-id shuffle.
        progress: show tqdm progress bars while reading.
        verbose: print the summary (`format_summary`).

    Returns:
        The statistics also written to ``stats.json``: inputs and settings, counts (users, items, interactions, rows
        per split, k-core rounds) and ``skipped`` (``"<file>:<reason>" -> {"count", "first_lines"}``).

    Raises:
        FileNotFoundError: an input file is missing.
        ValueError: bad settings (no default window for the category, start >= end, k_core < 1, max_history < 1), an
            unreadable file, or too little data left for three non-empty splits (the message shows the drop counts).
    """
    reviews, meta, output_dir = Path(reviews), Path(meta), Path(output_dir)
    for path, what in ((reviews, "reviews"), (meta, "meta")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} not found (expected Amazon 2018 JSON lines, .json[.gz])")
    if category is None:
        category = reviews.name.split(".json")[0]
    if start is None or end is None:
        if category not in DEFAULT_WINDOWS:
            raise ValueError(
                f"no default time window for category {category!r} (defaults exist for {sorted(DEFAULT_WINDOWS)}); "
                "pass start and end (--start/--end) as YYYY-MM-DD"
            )
        start = start if start is not None else DEFAULT_WINDOWS[category][0]
        end = end if end is not None else DEFAULT_WINDOWS[category][1]
    t0, t1 = _parse_date(start, "start"), _parse_date(end, "end")
    if t0 >= t1:
        raise ValueError(f"start={start} must be before end={end} (end is exclusive)")
    if k_core < 1 or max_history < 1:
        raise ValueError(f"k_core ({k_core}) and max_history ({max_history}) must be >= 1")

    skipped = SkipLog()
    titles = read_meta(meta, skipped, progress)
    inter = read_reviews(reviews, titles, t0, t1, skipped, progress)
    keep, rounds = k_core_mask(inter.user, inter.item, k_core)
    if (~keep).any():
        skipped.counts["reviews:removed_by_k_core"] = int((~keep).sum())
        skipped.first_lines["reviews:removed_by_k_core"] = inter.line[~keep][:MAX_EXAMPLES].tolist()
    user, item, time, line = inter.user[keep], inter.item[keep], inter.time[keep], inter.line[keep]
    rows = build_rows(user, item, time, line, max_history)
    parts = split_rows(rows)
    if any(not part for part in parts.values()):
        raise ValueError(
            f"only {len(rows)} rows left after filtering ({keep.sum()} interactions), too few for non-empty "
            f"train/valid/test splits. Dropped lines: {skipped.counts}. Widen the window (start/end) or lower k_core."
        )
    kept_items = np.unique(item)
    ids = shuffled_item_ids([inter.items[i] for i in kept_items.tolist()], seed)
    new_id = np.full(len(inter.items), -1, dtype=np.int64)
    new_id[kept_items] = [ids[inter.items[i]] for i in kept_items.tolist()]
    catalogue = [""] * len(ids)
    for asin, i in ids.items():
        catalogue[i] = titles[asin]
    remap = new_id.tolist()
    splits = {name: [([remap[i] for i in h], remap[t]) for h, t in part] for name, part in parts.items()}
    write_dataset(output_dir, catalogue, splits)

    stats = {
        "category": category,
        "reviews_file": str(reviews),
        "meta_file": str(meta),
        "window": {"start": start, "end": end, "end_exclusive": True, "timezone": "UTC"},
        "k_core": k_core,
        "max_history": max_history,
        "seed": seed,
        "title_rules": {"min_chars": MIN_TITLE_CHARS, "max_words": MAX_TITLE_WORDS},
        "meta_items_with_title": len(titles),
        "reviews_in_window": int(inter.user.size),
        "k_core_rounds": rounds,
        "users": int(np.unique(user).size),
        "items": len(catalogue),
        "distinct_titles": len(set(catalogue)),
        "interactions": int(keep.sum()),
        "rows": {name: len(part) for name, part in splits.items()},
        "skipped": skipped.as_dict(),
    }
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    (output_dir / "README.md").write_text(
        f"# {category} ({start}..{end}, end exclusive)\n\n"
        "Amazon Review Data (2018) prepared by `trl-flower prepare` as in the Flower paper (arXiv 2503.07377): "
        f"items and users with fewer than {k_core} interactions removed, at most {max_history} history items, "
        "chronological 8:1:1 split by target time.\n\n"
        f"items: {len(catalogue)}; rows: train {len(splits['train'])}, valid {len(splits['valid'])}, "
        f"test {len(splits['test'])}\n\n"
        "items.tsv: item_id, title. Several item ids can share one title.\n"
        "train/valid/test.csv: history_item_id, history_item_title (JSON lists, oldest first), item_id, item_title.\n"
        "Row i of train.csv is training example i (keep the order: auxiliary-model scores are indexed by it).\n"
        "stats.json: settings, counts and skipped lines.\n",
        encoding="utf-8",
    )
    if verbose:
        print(format_summary(stats))
    return stats
