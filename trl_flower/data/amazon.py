"""Loader for the BIGRec-style Amazon splits used by the Flower paper (arXiv 2503.07377, flower_reference.md §5).

A dataset directory holds four files:

* ``items.tsv``: header ``item_id<TAB>title``, then one line per item; the id is the 0-based line number. Several
  ids can share one title (CDs_and_Vinyl: 464 extra ids on 185 titles).
* ``train.csv``, ``valid.csv``, ``test.csv``: header ``history_item_id,history_item_title,item_id,item_title``; the
  two history columns are JSON lists (oldest first, at most 10 items). Rows are sorted by target time and row ``i``
  of ``train.csv`` is training example ``i``: auxiliary-model scores (SASRec logits) are indexed by it, so the order
  is kept and exposed as the ``row_index`` column.

Every row is validated against ``items.tsv``: an unknown item id, a title that differs from the catalogue, a
malformed JSON list or history columns of different lengths raise a `ValueError` naming the file, the line and the
item. Nothing is dropped silently.

Example:
    >>> from trl_flower.data import load_amazon
    >>> data = load_amazon("CDs_and_Vinyl")  # doctest: +SKIP
    >>> len(data.items), data.splits["train"].num_rows  # doctest: +SKIP
    (5841, 49251)
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

DATA_ENV = "TRL_FLOWER_DATA"
"""Environment variable naming the shared data root (the directory that contains ``amazon/``)."""

SPLITS = ("train", "valid", "test")
ITEMS_FILE = "items.tsv"
CSV_COLUMNS = ("history_item_id", "history_item_title", "item_id", "item_title")


def default_data_root() -> Path:
    """The data root that holds ``amazon/<category>/``.

    Resolution order: ``$TRL_FLOWER_DATA``; else ``../shared/data`` next to the current working directory; else
    ``../shared/data`` next to the repository that contains this package.

    Raises:
        FileNotFoundError: ``$TRL_FLOWER_DATA`` is set but is not a directory, or no candidate exists. The message
            lists every path that was tried and says which variable to set.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"${DATA_ENV}={env!r} is not a directory; point it at the data root that contains amazon/<category>/"
            )
        return path
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [Path.cwd().parent / "shared" / "data", repo_root.parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no data root found (tried {tried}); set ${DATA_ENV} to the directory that contains amazon/<category>/, "
        "or pass the dataset directory itself to load_amazon()"
    )


def resolve_dataset_dir(data_dir_or_category: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """Find a dataset directory from a path or a category name.

    Args:
        data_dir_or_category: a directory that contains ``items.tsv`` (used as is), or a category name such as
            ``"CDs_and_Vinyl"`` looked up as ``<data_root>/amazon/<name>``.
        data_root: the root for category names; defaults to `default_data_root()`.

    Raises:
        FileNotFoundError: neither a dataset directory nor a known category; the message lists the available ones.
    """
    path = Path(data_dir_or_category).expanduser()
    if (path / ITEMS_FILE).is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory but has no {ITEMS_FILE}; pass a dataset directory")
    if len(path.parts) > 1:  # a path, not a category name
        raise FileNotFoundError(f"{path / ITEMS_FILE} not found; pass a dataset directory or a category name")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    candidate = root / "amazon" / str(data_dir_or_category)
    if (candidate / ITEMS_FILE).is_file():
        return candidate
    available = sorted(p.name for p in (root / "amazon").glob("*") if (p / ITEMS_FILE).is_file())
    raise FileNotFoundError(
        f"dataset {str(data_dir_or_category)!r} not found: {candidate / ITEMS_FILE} does not exist. "
        f"Available under {root / 'amazon'}: {available or 'none'}. Pass a directory with items.tsv, or set "
        f"${DATA_ENV}."
    )


@dataclass
class AmazonData:
    """One loaded dataset: the catalogue and its splits.

    Attributes:
        name: the directory name, e.g. ``"CDs_and_Vinyl"`` (used to pick the prompt's category words).
        path: the dataset directory.
        items: item titles in id order (``items[i]`` is the title of item id ``i``).
        splits: ``"train"``/``"valid"``/``"test"`` -> `datasets.Dataset` with the columns ``history_item_id``
            (list[int]), ``history_item_title`` (list[str]), ``item_id`` (int), ``item_title`` (str) and
            ``row_index`` (int, the 0-based data row in the CSV file; file order is kept).
    """

    name: str
    path: Path
    items: list[str]
    splits: dict[str, Dataset] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """Number of item ids (lines of ``items.tsv``)."""
        return len(self.items)

    def title_to_ids(self) -> dict[str, list[int]]:
        """Title -> every item id with that title, ids ascending (duplicate titles map to several ids)."""
        out: dict[str, list[int]] = {}
        for item_id, title in enumerate(self.items):
            out.setdefault(title, []).append(item_id)
        return out


def select_rows(split: Dataset, max_rows: int = 0, sample_seed: int | None = None) -> Dataset:
    """At most `max_rows` rows of a split (0 = all): the first ones, or with `sample_seed` a random sample of them.

    The splits are sorted by target time, so the first rows are the oldest and are not a fair sample (on Movies_and_TV
    SASRec's HR@5 is 0.150 on the first 600 test rows and 0.100 on all of them). The sample keeps file order and its
    ``row_index`` column, so auxiliary-model scores still line up.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0 = all rows), got {max_rows}")
    if not max_rows or max_rows >= split.num_rows:
        return split
    if sample_seed is None:
        return split.select(range(max_rows))
    rows = np.random.default_rng(sample_seed).choice(split.num_rows, size=max_rows, replace=False)
    return split.select(np.sort(rows).tolist())


def read_items(path: str | os.PathLike) -> list[str]:
    """Read ``items.tsv`` (header ``item_id<TAB>title``; ids must be 0, 1, 2, ... in order).

    Raises:
        ValueError: a bad header, a line without a tab, a non-integer or out-of-order id, or an empty title; the
            message names the file and line.
    """
    path = Path(path)
    titles: list[str] = []
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n")
        if header.split("\t") != ["item_id", "title"]:
            raise ValueError(f"{path}:1: expected the header 'item_id<TAB>title', got {header!r}")
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            item_id, sep, title = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{line_no}: expected 'item_id<TAB>title', got {line[:80]!r}")
            if item_id != str(len(titles)):
                raise ValueError(
                    f"{path}:{line_no}: item id {item_id!r} out of order; ids must be 0..N-1 in line order "
                    f"(expected {len(titles)})"
                )
            if not title.strip():
                raise ValueError(f"{path}:{line_no}: item {item_id} has an empty title; give every item a title")
            titles.append(title)
    if not titles:
        raise ValueError(f"{path}: no items; the catalogue must list at least one item")
    return titles


def _parse_list(text: str, path: Path, line_no: int, column: str) -> list:
    """Parse one JSON-list cell; errors name the file, line and column."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (it looks like a Python repr; rewrite the column with json.dumps)" if text.startswith("['") else ""
        raise ValueError(f"{path}:{line_no}: column {column!r} is not a JSON list: {err}{hint}") from None
    if not isinstance(value, list):
        raise ValueError(f"{path}:{line_no}: column {column!r} must be a JSON list, got {type(value).__name__}")
    return value


def _check_item(items: Sequence[str], item_id: object, title: object, path: Path, line_no: int, column: str) -> int:
    """Validate one (id, title) pair against the catalogue and return the id as int."""
    if not isinstance(item_id, int) or isinstance(item_id, bool) or not 0 <= item_id < len(items):
        raise ValueError(
            f"{path}:{line_no}: unknown item id {item_id!r} in column {column!r}; items.tsv has ids 0..{len(items) - 1}"
            " (was the CSV written for another items.tsv?)"
        )
    if title != items[item_id]:
        raise ValueError(
            f"{path}:{line_no}: title mismatch for item id {item_id} in column {column!r}: the CSV says {title!r}, "
            f"items.tsv says {items[item_id]!r}; regenerate the splits with the same items.tsv (trl-flower prepare)"
        )
    return item_id


def read_split(path: str | os.PathLike, items: Sequence[str]) -> dict[str, list]:
    """Read one split CSV into columns, validating every row against the catalogue.

    Args:
        path: the CSV file (header must contain ``history_item_id,history_item_title,item_id,item_title``; other
            columns are ignored).
        items: the catalogue titles in id order (from `read_items`).

    Returns:
        A dict of equal-length lists: ``history_item_id``, ``history_item_title``, ``item_id``, ``item_title``,
        ``row_index`` (0-based data row, i.e. file order).

    Raises:
        ValueError: a missing column, a malformed JSON list, history lists of different lengths, an unknown item id
            or a title that differs from ``items.tsv``; the message names the file, line and item.
    """
    path = Path(path)
    cols: dict[str, list] = {name: [] for name in (*CSV_COLUMNS, "row_index")}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected the header {','.join(CSV_COLUMNS)}")
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing}; expected the header {','.join(CSV_COLUMNS)}")
        pos = [header.index(c) for c in CSV_COLUMNS]
        for record in reader:
            line_no = reader.line_num  # physical line of the record's end; records here are single-line
            if not record:
                continue
            if len(record) != len(header):
                raise ValueError(f"{path}:{line_no}: {len(record)} fields, the header has {len(header)}")
            hist_ids = _parse_list(record[pos[0]], path, line_no, "history_item_id")
            hist_titles = _parse_list(record[pos[1]], path, line_no, "history_item_title")
            if len(hist_ids) != len(hist_titles):
                raise ValueError(
                    f"{path}:{line_no}: history_item_id has {len(hist_ids)} entries but history_item_title has "
                    f"{len(hist_titles)}; the two columns must list the same items"
                )
            for item_id, title in zip(hist_ids, hist_titles):
                _check_item(items, item_id, title, path, line_no, "history_item_id")
            raw_id = record[pos[2]].strip()
            try:
                target = int(raw_id)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: item_id {raw_id!r} is not an integer") from None
            _check_item(items, target, record[pos[3]], path, line_no, "item_id")
            cols["history_item_id"].append(hist_ids)
            cols["history_item_title"].append(hist_titles)
            cols["item_id"].append(target)
            cols["item_title"].append(record[pos[3]])
            cols["row_index"].append(len(cols["row_index"]))
    return cols


def load_amazon(
    data_dir_or_category: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
) -> AmazonData:
    """Load a dataset directory (``items.tsv`` + split CSVs) into an `AmazonData`.

    Args:
        data_dir_or_category: a dataset directory, or a category name (``"CDs_and_Vinyl"``, ``"Movies_and_TV"``)
            looked up under ``<data_root>/amazon/``.
        data_root: root for category names; default `default_data_root()` (``$TRL_FLOWER_DATA`` or
            ``../shared/data``).
        splits: which split files to load (``<split>.csv``).

    Returns:
        `AmazonData` with ``items`` and one `datasets.Dataset` per split (columns listed in `AmazonData`).

    Raises:
        FileNotFoundError: the directory or a split file does not exist.
        ValueError: any invalid row (see `read_split`), or a training split without rows.
    """
    from datasets import Dataset, Features, List, Value

    path = resolve_dataset_dir(data_dir_or_category, data_root)
    items = read_items(path / ITEMS_FILE)
    features = Features(
        {
            "history_item_id": List(Value("int64")),
            "history_item_title": List(Value("string")),
            "item_id": Value("int64"),
            "item_title": Value("string"),
            "row_index": Value("int64"),
        }
    )
    loaded: dict[str, Dataset] = {}
    for split in splits:
        csv_path = path / f"{split}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path} not found; a dataset directory needs {', '.join(SPLITS)} CSV files")
        columns = read_split(csv_path, items)
        if split == "train" and not columns["item_id"]:
            raise ValueError(
                f"{csv_path}: a header but no rows. The training split needs at least one row: training, the item "
                "rewards (interaction counts) and the popularity groups all come from it. Regenerate the splits "
                "(trl-flower prepare) or point at another dataset."
            )
        loaded[split] = Dataset.from_dict(columns, features=features)
    return AmazonData(name=path.name, path=path, items=items, splits=loaded)
