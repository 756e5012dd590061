"""The duplicate check: exact and near duplicates of user turns (MinHash + LSH), its memory and
linearity, the signatures kept next to the shards, and the shard walk that uses them."""
import json
import random
import tracemalloc

import numpy as np
import pytest

from sa_sft.generate.dedup import (NUM_PERM, DuplicateIndex, Signatures, lsh_bands, minhash_signatures,
                                   shard_signatures)
from sa_sft.generate.filters import words
from sa_sft.rundir import RunDir

VOCAB = [f"w{i}" for i in range(2000)]


def jaccard(a: str, b: str) -> float:
    """The exact Jaccard similarity of two texts' word 5-gram sets (what the signatures estimate)."""
    def grams(text):
        t = words(text)
        return {" ".join(t[i:i + 5]) for i in range(max(1, len(t) - 4))}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def variant(rng: random.Random, text: str, target: float) -> str:
    """A copy of `text` with words replaced until its 5-gram Jaccard with it is at most `target`
    (each replacement lowers it by about 10 / the number of words)."""
    tokens = text.split()
    while jaccard(text, " ".join(tokens)) > target:
        tokens[rng.randrange(len(tokens))] = rng.choice(VOCAB)
    return " ".join(tokens)


def test_exact_and_near_duplicates():
    index = DuplicateIndex(near_threshold=0.6)
    base = "Can you explain how photosynthesis works in plants and why it matters for life on Earth?"
    assert index.check_and_add(base) is None
    assert index.check_and_add("  can you EXPLAIN how photosynthesis works in plants, and why it matters for life on earth ") == "duplicate"
    assert index.check_and_add(base.replace("on Earth?", "on our planet Earth today?")) == "near_duplicate"
    assert index.check_and_add("What are three good ways to learn a new language as an adult?") is None


def test_near_duplicates_at_0_9_are_caught_and_at_0_3_are_not():
    rng = random.Random(0)
    caught = {0.9: 0, 0.3: 0}
    for trial in range(40):
        base = random_text(rng, 400)
        for similarity in caught:
            other = variant(rng, base, similarity + 0.02)
            assert similarity - 0.03 < jaccard(base, other) <= similarity + 0.02
            index = DuplicateIndex(near_threshold=0.8)
            assert index.check_and_add(base) is None
            caught[similarity] += index.check_and_add(other) == "near_duplicate"
    assert caught == {0.9: 40, 0.3: 0}


def test_the_first_copy_wins_and_the_threshold_means_jaccard():
    rng = random.Random(1)
    a = random_text(rng, 50)
    b = variant(rng, a, 0.9)
    for first, second in ((a, b), (b, a)):
        index = DuplicateIndex(near_threshold=0.8)
        assert [index.check_and_add(first), index.check_and_add(second), index.check_and_add(first)] == \
            [None, "near_duplicate", "duplicate"]
    # 1 means exact duplicates only; a lower threshold catches less similar turns.
    exact_only = DuplicateIndex(near_threshold=1.0)
    assert [exact_only.check_and_add(t) for t in (a, b, a.upper())] == [None, None, "duplicate"]
    c = variant(rng, a, 0.55)
    loose = DuplicateIndex(near_threshold=0.4)
    assert [loose.check_and_add(t) for t in (a, c)] == [None, "near_duplicate"]
    strict = DuplicateIndex(near_threshold=0.8)
    assert [strict.check_and_add(t) for t in (a, c)] == [None, None]


def test_signatures_estimate_jaccard():
    rng = random.Random(2)
    errors = []
    for _ in range(150):
        a = random_text(rng, rng.randrange(20, 80))
        b = variant(rng, a, rng.uniform(0.1, 1.0))
        sig = minhash_signatures([a, b])
        errors.append((sig[0] == sig[1]).mean() - jaccard(a, b))
    errors = np.abs(errors)
    # Binomial error of 128 slots: sd <= 0.045; a biased or broken hash family is far off.
    assert errors.mean() < 0.04 and errors.max() < 0.16
    same_set = minhash_signatures(["one two three four five six", "ONE two three, four five six!"])
    assert (same_set[0] == same_set[1]).all()


def test_a_signature_depends_only_on_its_text():
    rng = random.Random(3)
    texts = [random_text(rng, rng.randrange(0, 40)) for _ in range(200)] + ["", "hi", "a b c d"]
    batch = minhash_signatures(texts, chunk=64)  # many blocks, texts cut across none
    alone = np.stack([minhash_signatures([t])[0] for t in texts])
    assert batch.shape == (len(texts), NUM_PERM) and batch.dtype == np.uint32
    assert (batch == alone).all()
    # Short texts are one shingle of their words: different short texts differ.
    assert (alone[-1] != alone[-2]).any() and (alone[-2] != alone[-3]).any()


def test_banding_finds_pairs_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= NUM_PERM
        assert 1 - (1 - threshold ** rows) ** bands >= 0.99


def templated_turns(n: int, rng: random.Random) -> list[str]:
    """Turns of one long template with a two-word slot: pairwise 5-gram Jaccard about 0.65, so they
    share LSH buckets but are not near duplicates at 0.8."""
    head = "please write a detailed and friendly explanation for a curious beginner about"
    tail = "so that someone who wants to understand the basic ideas can follow it today"
    seen, out = set(), []
    while len(out) < n:
        slot = (rng.choice(VOCAB), rng.choice(VOCAB))
        if slot not in seen:
            seen.add(slot)
            out.append(f"{head} {slot[0]} {slot[1]} {tail}")
    return out


def comparisons(turns: list[str], max_bucket) -> tuple[int, DuplicateIndex]:
    index = DuplicateIndex(near_threshold=0.8, max_bucket=max_bucket)
    index.check_and_add_all(Signatures.of(turns))
    return index.comparisons, index


def test_templated_turns_stay_linear():
    turns = templated_turns(2000, random.Random(4))
    assert 0.55 < jaccard(turns[0], turns[1]) < 0.75
    half, index_half = comparisons(turns[:1000], max_bucket=32)
    full, index = comparisons(turns, max_bucket=32)
    assert index.kept > 1800  # not near duplicates of each other
    assert index.largest_bucket() <= 32 and full <= len(turns) * index.bands * 32
    assert full / half < 2.3  # twice the turns, about twice the work
    # Without the cap the same turns compare with every earlier one sharing a bucket: quadratic.
    half_uncapped, _ = comparisons(turns[:1000], max_bucket=None)
    full_uncapped, uncapped = comparisons(turns, max_bucket=None)
    assert uncapped.largest_bucket() > 100
    assert full_uncapped / half_uncapped > 3.3 and full_uncapped > 3 * full


def memory_per_kept_turn(n_words: int) -> float:
    rng = random.Random(5)
    turns = [random_text(rng, n_words) for _ in range(3000)]
    signatures = Signatures.of(turns)
    tracemalloc.start()
    index = DuplicateIndex(near_threshold=0.8)
    index.check_and_add_all(signatures)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert index.kept == len(turns)
    return used / index.kept


def test_memory_per_kept_turn_is_bounded_and_independent_of_its_length():
    short, long = memory_per_kept_turn(30), memory_per_kept_turn(600)
    # A signature (512 bytes), the exact key and one bucket entry per band; no shingle set.
    assert short < 4096 and long < 4096
    assert abs(long - short) / short < 0.2


def write_shards(run: RunDir, shards: list[list[str]]) -> None:
    from sa_sft.io import atomic_write_jsonl
    for k, turns in enumerate(shards):
        atomic_write_jsonl(run.shard(k), [{"id": f"s{k}-{i}", "messages": [{"role": "user", "content": t},
                                                                          {"role": "assistant", "content": "ok"}]}
                                          for i, t in enumerate(turns)])


def test_signatures_are_kept_next_to_the_shard_and_remade_when_stale(tmp_path):
    run = RunDir(tmp_path)
    rng = random.Random(6)
    turns = [random_text(rng, 20) for _ in range(10)]
    path = run.shard_signatures(0)
    first = shard_signatures(path, "sha-a", turns)
    assert path.is_file()
    saved = path.read_bytes()
    # Same shard: read back, not recomputed (the file is untouched and the values equal).
    again = shard_signatures(path, "sha-a", turns)
    assert path.read_bytes() == saved and (again.minhash == first.minhash).all() and (again.exact == first.exact).all()
    # The shard changed (another hash): remade from the new texts.
    changed = shard_signatures(path, "sha-b", turns[::-1])
    assert (changed.minhash == first.minhash[::-1]).all()
    assert Signatures.load(path, "sha-a") is None and Signatures.load(path, "sha-b") is not None
    # A torn or foreign file is remade, never trusted.
    good = path.read_bytes()
    for torn in (b"not a numpy file", b"", good[:len(good) // 2], good[:100]):
        path.write_bytes(torn)
        assert Signatures.load(path, "sha-b") is None
        assert (shard_signatures(path, "sha-b", turns[::-1]).exact == changed.exact).all()
        assert path.read_bytes() == good


def test_the_shard_walk_is_incremental_and_reuses_signatures(tmp_path):
    from sa_sft.generate.stage import Selection
    rng = random.Random(7)
    base = [random_text(rng, 150) for _ in range(30)]
    # Shards with exact duplicates, near duplicates (Jaccard ~0.94, of earlier shards too) and fresh turns.
    shards = [base[:8], [base[0], variant(rng, base[1], 0.95)] + base[8:14], base[14:22] + [base[3].upper()],
              [variant(rng, base[20], 0.95)] + base[22:30]]
    run = RunDir(tmp_path)
    write_shards(run, shards)
    whole = Selection(run, 100, DuplicateIndex(), None).walk(4)
    assert [row["reason"] for row in whole.dropped] == ["duplicate", "near_duplicate", "duplicate", "near_duplicate"]
    assert whole.have == sum(map(len, shards)) - 4
    assert all(run.shard_signatures(k).is_file() for k in range(4))
    stamps = [run.shard_signatures(k).stat().st_mtime_ns for k in range(4)]
    # Walking 2 shards, then all 4 (a top-up round), selects the same as one walk; no signature remade.
    rounds = Selection(run, 100, DuplicateIndex(), None).walk(2)
    rounds.walk(4)
    assert rounds.shards == whole.shards and rounds.dropped == whole.dropped
    assert [run.shard_signatures(k).stat().st_mtime_ns for k in range(4)] == stamps
    # A target reached mid-shard: the rows looked at are taken, the rest of the shard is not.
    short = Selection(run, 10, DuplicateIndex(), None).walk(4)
    assert short.have == 10 and [s["take"] for s in short.shards] == [8, 4]
    assert short.shards[1]["skip"] == ["s1-0", "s1-1"]
    record = json.loads(json.dumps(short.shards[1]))
    assert record["rows"] == 8 and record["file"] == "shards/shard-00001.jsonl"


@pytest.mark.parametrize("threshold", [0.8, 1.0])
def test_the_walk_gives_what_the_index_gives_turn_by_turn(tmp_path, threshold):
    from sa_sft.generate.stage import Selection
    rng = random.Random(8)
    pool = [random_text(rng, 100) for _ in range(40)]
    shards = [[rng.choice(pool) if rng.random() < 0.3 else variant(rng, rng.choice(pool), 0.9)
               if rng.random() < 0.3 else random_text(rng, 100) for _ in range(12)] for _ in range(5)]
    run = RunDir(tmp_path)
    write_shards(run, shards)
    walked = Selection(run, 1000, DuplicateIndex(near_threshold=threshold), None).walk(5)
    one_by_one = DuplicateIndex(near_threshold=threshold)
    expected = [(f"s{k}-{i}", one_by_one.check_and_add(t)) for k, turns in enumerate(shards) for i, t in enumerate(turns)]
    assert [(row["id"], row["reason"]) for row in walked.dropped] == [(i, r) for i, r in expected if r]
    reasons = {row["reason"] for row in walked.dropped}
    assert reasons == ({"duplicate", "near_duplicate"} if threshold < 1 else {"duplicate"})
