"""Exact and near-duplicate user turns across every shard, in bounded memory and near-linear time.

Exact duplicates: a 64-bit hash of the normalized text. Near duplicates: the Jaccard similarity
of two turns' sets of word 5-grams, estimated by MinHash and found through LSH banding.

- Each 5-gram is hashed once to 64 bits (every distinct word through blake2b, cached, then the
  five word hashes folded and mixed in numpy), and the `NUM_PERM` minimum hashes of a batch of
  turns come from one numpy operation: h_i(x) = (a_i * x + b_i) mod 2^64 >> 32 (multiply-add-
  shift, a universal family; the inputs are already well mixed).
- A turn's candidates are the kept turns sharing one of its LSH band keys. The verdict is the
  estimated Jaccard (the share of equal signature slots) against each candidate, so no shingle
  set is kept: a kept turn costs `NUM_PERM` uint32 plus one dict entry per band.
- Each bucket holds at most `MAX_BUCKET` turns. Templated turns that share a band but are not
  near duplicates of each other would otherwise make every new turn compare against all of
  them (quadratic); with the cap a turn is compared with at most bands x MAX_BUCKET others.
  The price: a near duplicate of a turn that found every one of its buckets full is missed.

Signatures are a pure function of the text, so the ones of a shard are computed once and kept
next to it (`RunDir.shard_signatures`), tied to the shard's sha256: a top-up round or a resumed
run hashes only shards it has not seen.
"""
import hashlib
import io
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sa_sft.generate.filters import normalize
from sa_sft.io import atomic_write_bytes

log = logging.getLogger("sa_sft.generate")

NUM_PERM = 128
SHINGLE = 5
MAX_BUCKET = 32
# LSH bands per turn: each is one dict entry per kept turn, so this bounds the index's memory.
MAX_BANDS = 16
# The banding must find a pair at exactly the threshold with at least this probability.
BAND_RECALL = 0.99
# Changing how signatures are computed must invalidate the files kept next to the shards.
SCHEME = f"minhash-v1/blake2b-words/shingle{SHINGLE}/perm{NUM_PERM}/multiply-add-shift"

_M64 = (1 << 64) - 1
_FOLD = np.uint64(0x9E3779B97F4A7C15)  # odd: folding word hashes into a 5-gram hash is a bijection per step
_MIX1, _MIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)  # murmur3's fmix64


def _stable_u64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# The permutations' (a, b) from blake2b, not numpy's RNG, so signatures on disk stay valid across versions.
_A = np.array([_stable_u64(b"a%d" % i) | 1 for i in range(NUM_PERM)], dtype=np.uint64)
_B = np.array([_stable_u64(b"b%d" % i) for i in range(NUM_PERM)], dtype=np.uint64)
# Hashes of words seen so far (chat turns reuse a small vocabulary); cleared when it grows past this.
_WORD_CACHE: dict[str, int] = {}
_WORD_CACHE_MAX = 1 << 20


def _word_hash(word: str) -> int:
    h = _WORD_CACHE.get(word)
    if h is None:
        if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
            _WORD_CACHE.clear()
        h = _WORD_CACHE[word] = _stable_u64(word.encode())
    return h


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(33))
    x = x * _MIX2
    return x ^ (x >> np.uint64(33))


def exact_key(text: str) -> int:
    """64 bits of the normalized text's hash: equal for texts that differ only in case, spacing, punctuation."""
    return _exact_key(normalize(text))


def _exact_key(normalized: str) -> int:
    return _stable_u64(normalized.encode())


def _word_hashes(words: list[str]) -> list[int]:
    hashes = list(map(_WORD_CACHE.get, words))
    if None in hashes:
        hashes = [h if h is not None else _word_hash(w) for w, h in zip(words, hashes)]
    return hashes


def shingle_hashes(normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hashes of every normalized text's word 5-grams, concatenated; start of each text's run).

    A text of fewer than 5 words is one shingle of all its words (an empty text: of none), as
    in the exact-Jaccard definition, so every text has at least one.
    """
    flat, lengths = [], []
    for text in normalized:
        words = text.split()
        flat += _word_hashes(words)
        lengths.append(len(words))
    w = np.array(flat, dtype=np.uint64)
    lengths = np.array(lengths, dtype=np.int64)
    word_starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
    # Every window of 5 consecutive words, folded as a polynomial (order matters), then mixed.
    n_windows = max(len(w) - SHINGLE + 1, 0)
    windows = np.zeros(n_windows, dtype=np.uint64)
    for j in range(SHINGLE):
        windows = windows * _FOLD + w[j:j + n_windows]
    # Windows that stay inside one text: positions 0 .. len-5 of each text of 5 words or more.
    long = lengths >= SHINGLE
    counts = np.where(long, lengths - SHINGLE + 1, 1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else counts
    out = np.empty(int(counts.sum()), dtype=np.uint64)
    if long.any():
        pos = np.repeat(word_starts[long], counts[long]) + _ranges(counts[long])
        out[np.repeat(long, counts)] = windows[pos]
    for i in np.flatnonzero(~long):  # short texts: their few words, with the word count folded in first
        h = int(lengths[i]) + 1
        for x in flat[word_starts[i]:word_starts[i] + lengths[i]]:
            h = (h * int(_FOLD) + x) & _M64
        out[starts[i]] = h
    return _fmix(out), starts


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each c, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1]) - np.repeat(ends - counts, counts)


def minhash_signatures(texts: list[str], chunk: int = 8192) -> np.ndarray:
    """[len(texts), NUM_PERM] uint32: P(slot i equal for two texts) = Jaccard of their word 5-gram sets."""
    return _minhash([normalize(t) for t in texts], chunk)


def _minhash(normalized: list[str], chunk: int = 8192) -> np.ndarray:
    hashes, starts = shingle_hashes(normalized)
    out = np.empty((NUM_PERM, len(normalized)), dtype=np.uint32)
    # Whole texts per block of about `chunk` shingles: a [NUM_PERM, chunk] block stays in cache
    # (measured 4x faster than one [shingles, NUM_PERM] array).
    bounds = np.append(starts, len(hashes))
    t = 0
    while t < len(normalized):
        t_end = max(int(np.searchsorted(bounds, bounds[t] + chunk, side="right")) - 1, t + 1)
        lo, hi = bounds[t], bounds[t_end]
        values = np.multiply.outer(_A, hashes[lo:hi])
        values += _B[:, None]
        mins = np.minimum.reduceat(values, starts[t:t_end] - lo, axis=1)
        out[:, t:t_end] = mins >> np.uint64(32)
        t = t_end
    return np.ascontiguousarray(out.T)


@dataclass
class Signatures:
    """Exact keys and MinHash signatures of a list of turns (one shard's user turns)."""
    exact: np.ndarray    # [n] uint64
    minhash: np.ndarray  # [n, NUM_PERM] uint32

    @classmethod
    def of(cls, texts: list[str]) -> "Signatures":
        normalized = [normalize(t) for t in texts]
        return cls(np.array([_exact_key(t) for t in normalized], dtype=np.uint64), _minhash(normalized))

    def save(self, path: Path, source_sha256: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, exact=self.exact, minhash=self.minhash, meta=np.array([SCHEME, source_sha256]))
        # A cache: a file torn by a power cut fails to load (or to match) and is remade, so no fsync
        # (one per shard of 64 turns cost more than hashing them).
        atomic_write_bytes(path, buf.getvalue(), fsync=False)

    @classmethod
    def load(cls, path: Path, source_sha256: str) -> "Signatures | None":
        """The saved signatures, or None when missing, unreadable or made from another file or scheme."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if list(f["meta"]) != [SCHEME, source_sha256]:
                    return None
                return cls(f["exact"], f["minhash"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None


def shard_signatures(path: Path, source_sha256: str, texts: list[str]) -> Signatures:
    """A shard's signatures from `path` if they were made from this very shard, else computed and saved."""
    found = Signatures.load(path, source_sha256)
    if found is not None and len(found.exact) == len(texts):
        return found
    signatures = Signatures.of(texts)
    signatures.save(path, source_sha256)
    return signatures


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, max_bands: int = MAX_BANDS) -> tuple[int, int]:
    """(bands, rows per band): among the bandings that find a pair at Jaccard = threshold with
    probability >= BAND_RECALL, the one with the fewest chance candidates at half the threshold."""
    best = None
    for bands in range(1, max_bands + 1):
        for rows in range(1, num_perm // bands + 1):
            found = lambda j: 1 - (1 - j ** rows) ** bands  # noqa: E731
            if found(threshold) < BAND_RECALL:
                continue
            key = (found(threshold / 2), -found(threshold), bands)
            if best is None or key < best[0]:
                best = (key, bands, rows)
    return (best[1], best[2]) if best else (max_bands, 1)


@dataclass
class DuplicateIndex:
    """Exact and near duplicates of user turns across every shard seen so far. Shards are fed in
    shard order, so the first copy wins. `near_threshold` >= 1 checks exact duplicates only."""
    near_threshold: float = 0.8
    max_bucket: int | None = MAX_BUCKET
    exact: set = field(default_factory=set)
    buckets: dict = field(default_factory=dict)
    kept: int = 0
    comparisons: int = 0  # candidate signatures compared, for the linearity test and benchmark

    def __post_init__(self):
        self.near = self.near_threshold < 1
        self.bands, self.rows = lsh_bands(self.near_threshold) if self.near else (0, 0)
        self.signatures = np.empty((1024 if self.near else 0, NUM_PERM), dtype=np.uint32)
        salts = [_stable_u64(b"band%d" % b) for b in range(self.bands)]
        self._salts = np.array(salts, dtype=np.uint64)

    def band_keys(self, minhash: np.ndarray) -> np.ndarray:
        """[n, bands] uint64: one key per band of `rows` signature slots."""
        bands = minhash[:, :self.bands * self.rows].reshape(len(minhash), self.bands, self.rows).astype(np.uint64)
        h = np.zeros(bands.shape[:2], dtype=np.uint64)
        for r in range(self.rows):
            h = h * _FOLD + bands[:, :, r]
        return _fmix(h ^ self._salts[None, :])

    def check_and_add(self, text: str) -> str | None:
        return self.checker(Signatures.of([text]))(0)

    def check_and_add_all(self, signatures: Signatures) -> list[str | None]:
        check = self.checker(signatures)
        return [check(i) for i in range(len(signatures.exact))]

    def checker(self, signatures: Signatures):
        """`check(i)`: the verdict on turn i of `signatures` (None: kept, and added to the index).
        Call it in order; a turn never checked (e.g. contaminated) is never added."""
        keys = self.band_keys(signatures.minhash).tolist() if self.near else None

        def check(i: int) -> str | None:
            return self._check_and_add(int(signatures.exact[i]), signatures.minhash[i] if self.near else None,
                                       keys[i] if self.near else None)
        return check

    def _check_and_add(self, exact: int, sig: np.ndarray | None, keys: list[int] | None) -> str | None:
        if exact in self.exact:
            return "duplicate"
        if self.near:
            candidates = set()
            for key in keys:
                members = self.buckets.get(key)
                if isinstance(members, list):
                    candidates.update(members)
                elif members is not None:
                    candidates.add(members)
            if candidates:
                self.comparisons += len(candidates)
                others = self.signatures[np.fromiter(candidates, dtype=np.int64, count=len(candidates))]
                if ((others == sig).mean(axis=1) >= self.near_threshold).any():
                    return "near_duplicate"
            self._add_signature(sig, keys)
        self.exact.add(exact)
        self.kept += 1
        return None

    def _add_signature(self, sig: np.ndarray, keys: list[int]) -> None:
        row = self.kept
        if row == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[row] = sig
        for key in keys:
            members = self.buckets.get(key)
            if members is None:
                self.buckets[key] = row
            elif not isinstance(members, list):
                self.buckets[key] = [members, row]
            elif self.max_bucket is None or len(members) < self.max_bucket:
                members.append(row)

    def largest_bucket(self) -> int:
        return max((len(m) if isinstance(m, list) else 1 for m in self.buckets.values()), default=0)
