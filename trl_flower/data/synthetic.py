r"""A built-in synthetic catalogue: deterministic, no download, in the same form as the Amazon loader.

It exists so that the demo, tests and quick experiments run on a fresh machine and still look like real
recommendation data to every downstream piece (prompts, popularity groups, the trainer, metrics):
`make_synthetic` returns an `AmazonData` whose splits have exactly the Amazon loader's columns
(``history_item_id``, ``history_item_title``, ``item_id``, ``item_title``, ``row_index``), and `save_synthetic` writes
the same ``items.tsv`` + ``train/valid/test.csv`` files that `load_amazon` reads.

The generative model (all draws from one ``numpy.random.Generator`` seeded by ``seed``):

* **Genres.** Items belong to one of C genres (clusters); a genre has its own title words, so the genre of an item
  can be read from its title and a language model can learn genre-level patterns. Titles are two or three words
  ("Velvet Smoke", "The Neon Circuit", "Echoes of Thunder"). About 8 % of items are *variants* of an earlier item
  of the same genre ("Velvet Smoke" → "Velvet Smoke (Live)"), so some titles are prefixes of others, and a few
  items share one title with another item (duplicate titles, as in Amazon's catalogue).
* **Popularity.** A Zipf law over a random ranking of all items, :math:`w_i \propto \mathrm{rank}_i^{-s}` with
  ``zipf_exponent`` s (long tail: the top 10 % of items carry roughly half of the interactions at the defaults).
* **Sequences.** Genres form a ring-like Markov chain: from genre c a user stays in c, moves to one of c's two
  successor genres, returns to their own preferred genre, or jumps anywhere by genre mass. The preferred genre
  drifts along the chain now and then. Inside the chosen genre the next item is drawn by popularity; with
  probability ``p_global`` it is drawn from global popularity instead, and a variant follows its base item with
  probability ``p_variant``. Users never repeat an item.
* **Splits.** Every user starts at a random time and interacts at exponential gaps. Each interaction with a
  non-empty history becomes one row (history = the user's previous ``max_history`` items, oldest first); rows are
  sorted by time and cut 8:1:1 into train/valid/test, as in BIGRec's chronological split. ``row_index`` is the row
  number inside its split (time order).

Example:
    >>> data = make_synthetic(num_items=120, num_users=200, seed=0)
    >>> sorted(data.splits), data.splits["train"].column_names
    (['test', 'train', 'valid'], ['history_item_id', 'history_item_title', 'item_id', 'item_title', 'row_index'])
    >>> make_synthetic(num_items=120, num_users=200, seed=0).items == data.items
    True
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trl_flower.data.amazon import ITEMS_FILE, SPLITS, AmazonData

SYNTHETIC_NAME = "synthetic"
"""`AmazonData.name` of a synthetic dataset (prompt builders map it to the category word ``items``)."""

# Genre name -> (adjective-like words, noun-like words). Words are distinct across genres so that a title names
# its genre; all are plain ASCII so every tokenizer handles them.
GENRES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "jazz": (
        ("Velvet", "Smoky", "Blue", "Midnight", "Mellow", "Swinging", "Cool", "Late", "Sultry", "Golden", "Muted"),
        ("Smoke", "Lounge", "Saxophone", "Trumpet", "Standards", "Ballads", "Groove", "Session", "Club", "Bebop"),
    ),
    "rock": (
        ("Electric", "Loud", "Broken", "Wild", "Burning", "Heavy", "Raw", "Restless", "Iron", "Reckless", "Savage"),
        ("Guitars", "Highway", "Thunder", "Riot", "Engine", "Amplifier", "Garage", "Rebels", "Stones", "Fire"),
    ),
    "classical": (
        (
            "Grand",
            "Royal",
            "Baroque",
            "Serene",
            "Noble",
            "Eternal",
            "Pastoral",
            "Solemn",
            "Gentle",
            "Majestic",
            "Sacred",
        ),
        (
            "Sonatas",
            "Concerto",
            "Symphony",
            "Requiem",
            "Nocturnes",
            "Quartets",
            "Preludes",
            "Overture",
            "Fugue",
            "Variations",
        ),
    ),
    "electronic": (
        ("Neon", "Digital", "Cosmic", "Synthetic", "Pulsing", "Hyper", "Binary", "Orbital", "Liquid", "Laser", "Deep"),
        ("Circuit", "Pulse", "Signal", "Voltage", "Machines", "Waves", "Grid", "Beats", "Frequency", "Transmission"),
    ),
    "folk": (
        ("Wooden", "Rustic", "Quiet", "Wandering", "Humble", "Old", "Simple", "Autumn", "Misty", "Green", "Homespun"),
        ("Meadow", "Ballad", "Harvest", "River", "Cabin", "Fiddle", "Hills", "Lantern", "Orchard", "Porch"),
    ),
    "hiphop": (
        ("Street", "Fresh", "Urban", "Hard", "Smooth", "Real", "Underground", "Bold", "Concrete", "Hustling", "Dope"),
        ("Rhymes", "Block", "Flow", "Hustle", "Cypher", "Corner", "Mixtape", "Bounce", "Verses", "Crown"),
    ),
    "country": (
        (
            "Dusty",
            "Lonesome",
            "Southern",
            "Whiskey",
            "Sweet",
            "Rolling",
            "Honest",
            "Prairie",
            "Cotton",
            "Sunset",
            "Rodeo",
        ),
        ("Roads", "Boots", "Saloon", "Heartache", "Pickup", "Ranch", "Tumbleweed", "Canyon", "Creek", "Outlaws"),
    ),
    "soul": (
        ("Silky", "Warm", "Tender", "Soulful", "Sweet", "Deep", "Honey", "Gospel", "Burning", "Sunday", "Rich"),
        (
            "Harmony",
            "Rhythm",
            "Heartbeat",
            "Devotion",
            "Embrace",
            "Testimony",
            "Feeling",
            "Serenade",
            "Moments",
            "Affection",
        ),
    ),
    "metal": (
        ("Dark", "Black", "Infernal", "Crushing", "Frozen", "Brutal", "Cursed", "Molten", "Grim", "Howling", "Steel"),
        ("Abyss", "Inferno", "Throne", "Storm", "Serpent", "Ruins", "Blades", "Wrath", "Tomb", "Legion"),
    ),
    "ambient": (
        ("Drifting", "Still", "Hazy", "Floating", "Silent", "Distant", "Pale", "Soft", "Endless", "Hollow", "Dim"),
        ("Horizons", "Clouds", "Tides", "Echoes", "Dunes", "Glacier", "Mist", "Silence", "Dreams", "Shores"),
    ),
    "latin": (
        (
            "Tropical",
            "Caliente",
            "Havana",
            "Festive",
            "Sunny",
            "Vivid",
            "Carnival",
            "Salsa",
            "Rhythmic",
            "Ocean",
            "Fiery",
        ),
        ("Fiesta", "Mambo", "Tango", "Plaza", "Guitarra", "Corazon", "Bongos", "Paradise", "Noches", "Samba"),
    ),
    "blues": (
        (
            "Muddy",
            "Weary",
            "Crossroad",
            "Rambling",
            "Lowdown",
            "Bottleneck",
            "Delta",
            "Worried",
            "Midnight",
            "Slow",
            "Gritty",
        ),
        ("Shuffle", "Harmonica", "Train", "Juke", "Bayou", "Levee", "Porchlight", "Moan", "Boogie", "Jukebox"),
    ),
}
VARIANT_SUFFIXES = ("(Live)", "Again", "Vol. 2", "(Remastered)", "Deluxe Edition", "Reprise")
TITLE_PATTERNS = ("{a} {n}", "The {a} {n}", "{n} of {n2}", "{a} {n} and {n2}")


@dataclass(frozen=True)
class SyntheticCatalogue:
    """The ground truth behind a synthetic dataset (handy for baselines and for checking what a model learned).

    Attributes:
        items: title of every item id.
        genre: int64 [num_items], the genre (cluster) of every item.
        genre_names: name of every genre.
        popularity: float64 [num_items], the Zipf weight w_i of every item (sums to 1).
        variant_of: int64 [num_items], the base item of a variant, -1 for a base item.
        successors: int64 [num_genres, 2], the two successor genres of every genre in the genre Markov chain.
    """

    items: list[str]
    genre: np.ndarray
    genre_names: list[str]
    popularity: np.ndarray
    variant_of: np.ndarray
    successors: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_genres(self) -> int:
        return len(self.genre_names)


@dataclass(frozen=True)
class SyntheticSequenceModel:
    """Probabilities of the user-behaviour model (see the module docstring); defaults give Amazon-like data.

    Attributes:
        p_stay: stay in the current genre.
        p_successor: move to one of the current genre's two successors.
        p_preferred: return to the user's preferred genre.
        p_global: draw the item from global popularity instead of the chosen genre.
        p_variant: a variant follows its base item right after it (when not yet consumed).
        p_drift: the preferred genre moves to a successor at each step.
        genre_popularity_power: inside a genre items are drawn with weight w_i ** power (1 = plain popularity).
    """

    p_stay: float = 0.5
    p_successor: float = 0.3
    p_preferred: float = 0.1
    p_global: float = 0.15
    p_variant: float = 0.5
    p_drift: float = 0.05
    genre_popularity_power: float = 1.0

    def __post_init__(self) -> None:
        probs = {
            k: getattr(self, k) for k in ("p_stay", "p_successor", "p_preferred", "p_global", "p_variant", "p_drift")
        }
        bad = {k: v for k, v in probs.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"probabilities must lie in [0, 1], got {bad}")
        if self.p_stay + self.p_successor + self.p_preferred > 1.0:
            raise ValueError(
                "p_stay + p_successor + p_preferred must be <= 1 (the rest is a jump to a genre drawn by genre mass); "
                f"got {self.p_stay + self.p_successor + self.p_preferred:.3f}"
            )


def synthetic_catalogue(
    num_items: int = 300, num_genres: int = 8, zipf_exponent: float = 0.8, seed: int = 0
) -> SyntheticCatalogue:
    """Titles, genres, Zipf popularity and the genre chain of a synthetic catalogue.

    Args:
        num_items: number of items (>= 4 * num_genres).
        num_genres: number of genres (clusters), at most ``len(GENRES)``.
        zipf_exponent: s in w_i ∝ rank_i^-s; larger means a heavier head.
        seed: seed of every random choice.

    Raises:
        ValueError: too few items per genre, too many genres, or more items than the title patterns can name.
    """
    if not 1 <= num_genres <= len(GENRES):
        raise ValueError(f"num_genres must be in [1, {len(GENRES)}] (one word list per genre), got {num_genres}")
    if num_items < 4 * num_genres:
        raise ValueError(f"num_items must be >= 4 * num_genres = {4 * num_genres} so each genre has a few items")
    if zipf_exponent < 0:
        raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent}")
    rng = np.random.default_rng(seed)
    names = list(GENRES)[:num_genres]
    # genre sizes: uneven (Dirichlet), every genre gets at least 3 items
    share = rng.dirichlet(np.full(num_genres, 4.0))
    sizes = 3 + np.floor(share * (num_items - 3 * num_genres)).astype(np.int64)
    sizes[np.argsort(-share)[: num_items - int(sizes.sum())]] += 1  # hand out the rounding remainder
    genre = np.repeat(np.arange(num_genres), sizes)
    genre = genre[rng.permutation(num_items)]  # item ids are not grouped by genre

    items: list[str] = [""] * num_items
    variant_of = np.full(num_items, -1, dtype=np.int64)
    used: set[str] = set()
    for g, name in enumerate(names):
        adjectives, nouns = GENRES[name]
        members = np.flatnonzero(genre == g)
        n_variants = int(round(0.08 * members.size))
        bases, variants = members[: members.size - n_variants], members[members.size - n_variants :]
        candidates = _genre_titles(adjectives, nouns, rng)
        fresh = [t for t in candidates if t not in used][: bases.size]
        if len(fresh) < bases.size:
            raise ValueError(f"genre {name!r} can name only {len(fresh)} items; use more genres or fewer items")
        for item, title in zip(bases, fresh):
            items[item] = title
            used.add(title)
        for item in variants:  # "X" -> "X (Live)": the base title is a prefix of the variant
            base = int(rng.choice(bases))
            title = f"{items[base]} {VARIANT_SUFFIXES[int(rng.integers(len(VARIANT_SUFFIXES)))]}"
            if title in used:
                title = f"{items[base]} Vol. {int(rng.integers(3, 9))}"
            items[item], variant_of[item] = title, base
            used.add(title)
    # a few duplicate titles (~1 %): an item takes the title of another item of its genre
    n_dup = max(1, num_items // 100)
    for item in rng.choice(np.flatnonzero(variant_of < 0), size=n_dup, replace=False):
        same = np.flatnonzero((genre == genre[item]) & (np.arange(num_items) != item) & (variant_of < 0))
        items[item] = items[int(rng.choice(same))]

    ranks = rng.permutation(num_items) + 1  # rank 1 = most popular
    popularity = ranks.astype(np.float64) ** -zipf_exponent
    popularity /= popularity.sum()
    # genre chain: a random ring plus one random extra successor per genre
    ring = rng.permutation(num_genres)
    successors = np.zeros((num_genres, 2), dtype=np.int64)
    for k, g in enumerate(ring):
        successors[g, 0] = ring[(k + 1) % num_genres]
        successors[g, 1] = ring[(k + 2 + int(rng.integers(max(num_genres - 2, 1)))) % num_genres]
    return SyntheticCatalogue(items, genre.astype(np.int64), names, popularity, variant_of, successors)


def _genre_titles(adjectives, nouns, rng: np.random.Generator) -> list[str]:
    """Every title the patterns can build from one genre's words, in a seeded random order."""
    titles = []
    for pattern in TITLE_PATTERNS:
        for a in adjectives:
            for i, n in enumerate(nouns):
                n2 = nouns[(i + 1 + len(a)) % len(nouns)]
                titles.append(pattern.format(a=a, n=n, n2=n2))
    titles = list(dict.fromkeys(titles))  # patterns without {a} repeat; keep first occurrences
    # short patterns first (most titles are two words, like real album names), each group shuffled
    order = rng.permutation(len(titles))
    return sorted((titles[i] for i in order), key=lambda t: len(t.split()) > 2)


def simulate_sequences(
    catalogue: SyntheticCatalogue,
    num_users: int,
    behaviour: SyntheticSequenceModel | None = None,
    mean_length: float = 10.0,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One interaction sequence per user: ``(item ids, timestamps)``, both in time order.

    Args:
        catalogue: the items (from `synthetic_catalogue`).
        num_users: number of users.
        behaviour: the genre chain and popularity mixture (defaults of `SyntheticSequenceModel`).
        mean_length: mean sequence length; lengths are 5 + Poisson(mean_length - 5) (5-core, like Amazon).
        seed: seed of the simulation (independent of the catalogue's seed).
    """
    behaviour = behaviour or SyntheticSequenceModel()
    if mean_length < 5:
        raise ValueError(f"mean_length must be >= 5 (every user has at least 5 interactions), got {mean_length}")
    rng = np.random.default_rng(seed)
    M, C = catalogue.num_items, catalogue.num_genres
    w = catalogue.popularity
    in_genre = [np.flatnonzero(catalogue.genre == g) for g in range(C)]
    in_genre_w = [w[m] ** behaviour.genre_popularity_power for m in in_genre]
    genre_mass = np.array([w[m].sum() for m in in_genre])  # [C]
    variants_of = [np.flatnonzero(catalogue.variant_of == i) for i in range(M)]
    p_jump = 1.0 - behaviour.p_stay - behaviour.p_successor - behaviour.p_preferred
    move_p = np.array([behaviour.p_stay, behaviour.p_successor, behaviour.p_preferred, p_jump])

    sequences = []
    for _ in range(num_users):
        length = min(5 + int(rng.poisson(mean_length - 5)), M // 2)
        preferred = int(rng.choice(C, p=genre_mass))
        current = preferred
        seen = np.zeros(M, dtype=bool)
        seq: list[int] = []
        for _ in range(length):
            if rng.random() < behaviour.p_drift:
                preferred = int(catalogue.successors[preferred, rng.integers(2)])
            item = -1
            if seq:  # a variant follows its base item
                fresh_variants = [v for v in variants_of[seq[-1]] if not seen[v]]
                if fresh_variants and rng.random() < behaviour.p_variant:
                    item = int(rng.choice(fresh_variants))
            if item < 0:
                move = int(rng.choice(4, p=move_p))
                if move == 1:
                    current = int(catalogue.successors[current, rng.integers(2)])
                elif move == 2:
                    current = preferred
                elif move == 3:
                    current = int(rng.choice(C, p=genre_mass))
                if rng.random() < behaviour.p_global:
                    item = _draw(np.arange(M), w, seen, rng)
                else:
                    item = _draw(in_genre[current], in_genre_w[current], seen, rng)
            current = int(catalogue.genre[item])
            seen[item] = True
            seq.append(item)
        start = rng.random()
        times = start + np.cumsum(rng.exponential(0.05, size=len(seq)))
        sequences.append((np.array(seq, dtype=np.int64), times))
    return sequences


def _draw(candidates: np.ndarray, weights: np.ndarray, seen: np.ndarray, rng: np.random.Generator) -> int:
    """One unseen item from `candidates` by `weights`; falls back to any unseen item when the pool is used up."""
    p = np.where(seen[candidates], 0.0, weights)
    if p.sum() <= 0:
        candidates = np.flatnonzero(~seen)
        p = np.ones(candidates.size)
    return int(candidates[rng.choice(candidates.size, p=p / p.sum())])


def split_rows(
    sequences: list[tuple[np.ndarray, np.ndarray]],
    items: list[str],
    max_history: int = 10,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    return_times: bool = False,
) -> dict[str, dict[str, list]]:
    """Turn sequences into Amazon-style rows and split them chronologically.

    Returns:
        split name -> columns (``history_item_id``, ``history_item_title``, ``item_id``, ``item_title``,
        ``row_index``), rows in time order. With `return_times`, each split also gets a ``time`` column (the
        target's timestamp; not part of the Amazon form, for checks only).
    """
    if abs(sum(ratios) - 1.0) > 1e-9 or min(ratios) <= 0:
        raise ValueError(f"ratios must be three positive numbers summing to 1, got {ratios}")
    rows = []  # (time, history ids, target id)
    for seq, times in sequences:
        for k in range(1, seq.size):
            rows.append((float(times[k]), seq[max(0, k - max_history) : k].tolist(), int(seq[k])))
    rows.sort(key=lambda r: r[0])  # stable: equal times keep user order
    n = len(rows)
    cut1, cut2 = int(round(ratios[0] * n)), int(round((ratios[0] + ratios[1]) * n))
    out = {}
    for name, part in zip(SPLITS, (rows[:cut1], rows[cut1:cut2], rows[cut2:])):
        out[name] = {
            "history_item_id": [h for _, h, _ in part],
            "history_item_title": [[items[i] for i in h] for _, h, _ in part],
            "item_id": [t for _, _, t in part],
            "item_title": [items[t] for _, _, t in part],
            "row_index": list(range(len(part))),
        }
        if return_times:
            out[name]["time"] = [t for t, _, _ in part]
    return out


def make_synthetic(
    num_items: int = 300,
    num_users: int = 1000,
    *,
    num_genres: int = 8,
    zipf_exponent: float = 0.8,
    mean_length: float = 10.0,
    max_history: int = 10,
    behaviour: SyntheticSequenceModel | None = None,
    seed: int = 0,
    return_catalogue: bool = False,
) -> AmazonData | tuple[AmazonData, SyntheticCatalogue]:
    """Build a synthetic dataset in the Amazon loader's form (deterministic for a given seed).

    Args:
        num_items: catalogue size.
        num_users: number of simulated users; rows ≈ num_users * (mean_length - 1).
        num_genres: number of genres (clusters) in the catalogue, at most ``len(GENRES)`` (12).
        zipf_exponent: s of the Zipf popularity law.
        mean_length: mean interactions per user (>= 5).
        max_history: history items per row (the paper uses at most 10).
        behaviour: probabilities of the sequence model (`SyntheticSequenceModel` defaults).
        seed: one seed for the catalogue and the simulation.
        return_catalogue: also return the ground-truth `SyntheticCatalogue`.

    Returns:
        `AmazonData` named ``"synthetic"`` (path ``synthetic``; nothing is written to disk), with ``train``,
        ``valid`` and ``test`` datasets; with `return_catalogue`, the pair ``(data, catalogue)``.
    """
    from datasets import Dataset, Features, List, Value

    catalogue = synthetic_catalogue(num_items, num_genres, zipf_exponent, seed)
    sequences = simulate_sequences(catalogue, num_users, behaviour, mean_length, seed=seed + 1)
    columns = split_rows(sequences, catalogue.items, max_history)
    features = Features(
        {
            "history_item_id": List(Value("int64")),
            "history_item_title": List(Value("string")),
            "item_id": Value("int64"),
            "item_title": Value("string"),
            "row_index": Value("int64"),
        }
    )
    splits = {name: Dataset.from_dict(cols, features=features) for name, cols in columns.items()}
    data = AmazonData(name=SYNTHETIC_NAME, path=Path(SYNTHETIC_NAME), items=list(catalogue.items), splits=splits)
    return (data, catalogue) if return_catalogue else data


def save_synthetic(data: AmazonData, out_dir: str | os.PathLike) -> Path:
    """Write `data` as an Amazon-style dataset directory (``items.tsv`` + split CSVs) that `load_amazon` reads.

    Returns:
        The directory written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / ITEMS_FILE).open("w", encoding="utf-8") as f:
        f.write("item_id\ttitle\n")
        for i, title in enumerate(data.items):
            f.write(f"{i}\t{title}\n")
    for name, split in data.splits.items():
        with (out / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["history_item_id", "history_item_title", "item_id", "item_title"])
            for row in split:
                writer.writerow(
                    [
                        json.dumps(row["history_item_id"]),
                        json.dumps(row["history_item_title"]),
                        row["item_id"],
                        row["item_title"],
                    ]
                )
    return out
