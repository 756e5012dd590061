"""The statistics every score carries: accuracy with a Wilson interval, bootstrap intervals of ratios
(mean NLL, KL), and paired bootstrap changes between two models scored on the same items."""
import math
import random


def accuracy(correct: list[bool], chance: float | None = None) -> dict:
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    return {"metric": "accuracy", "value": round(k / max(n, 1), 4), "ci95": [round(low, 4), round(high, 4)],
            "n": n, **({"chance": round(chance, 4)} if chance is not None else {}),
            "per_item": [int(c) for c in correct]}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio_ci(sums: list[float], counts: list[int], seed: int = 0, resamples: int = 1000) -> list[float]:
    """95% interval of sum(sums)/sum(counts) over samples resampled with replacement."""
    if not sums:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(sums)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(sums[i] for i in idx) / max(sum(counts[i] for i in idx), 1))
    stats.sort()
    return [round(stats[int(0.025 * resamples)], 5), round(stats[int(0.975 * resamples) - 1], 5)]


def paired_bootstrap_delta(sums_a: list[float], sums_b: list[float], counts: list[int], seed: int = 0,
                           resamples: int = 2000) -> dict:
    """ratio(b) - ratio(a) over the same items, with a 95% interval from resampling items jointly.

    Pairing removes the spread between items, which both models share, so it separates two
    models scored on the same questions far better than comparing their separate intervals."""
    n = len(counts)
    if n == 0:
        return {"delta": 0.0, "ci95": [0.0, 0.0], "n": 0}
    ratio = lambda sums, idx: sum(sums[i] for i in idx) / max(sum(counts[i] for i in idx), 1)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(ratio(sums_b, idx) - ratio(sums_a, idx))
    stats.sort()
    everything = range(n)
    return {"delta": round(ratio(sums_b, everything) - ratio(sums_a, everything), 5),
            "ci95": [round(stats[int(0.025 * resamples)], 5), round(stats[int(0.975 * resamples) - 1], 5)], "n": n}


def item_sums(result: dict) -> tuple[list[float], list[int]]:
    """Per-item (sum, count) of a suite result: correct/1 for accuracy, NLL sum/tokens for NLL."""
    if "per_item" in result:
        return [float(c) for c in result["per_item"]], [1] * len(result["per_item"])
    counts = result["per_sample_tokens"]
    return [m * c for m, c in zip(result["per_sample_mean_nll"], counts)], counts


def seeded_bootstrap_delta(sums_a: list[list[float]], sums_b: list[list[float]], counts: list[int], seed: int = 0,
                           resamples: int = 2000) -> dict:
    """Like paired_bootstrap_delta, with several training seeds per method: the change is the mean
    over b's seeds minus the mean over a's, and each resample draws the items (jointly for every run)
    and, within each method, the seeds, so the interval holds both the items' and the seeds' spread.
    With one seed each it is the paired bootstrap."""
    n = len(counts)
    if n == 0 or not sums_a or not sums_b:
        return {"delta": 0.0, "ci95": [0.0, 0.0], "n": n, "seeds": [len(sums_a), len(sums_b)]}
    ratio = lambda sums, idx: sum(sums[i] for i in idx) / max(sum(counts[i] for i in idx), 1)
    mean_ratio = lambda runs, idx: sum(ratio(r, idx) for r in runs) / len(runs)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        runs_a = [sums_a[rng.randrange(len(sums_a))] for _ in sums_a]
        runs_b = [sums_b[rng.randrange(len(sums_b))] for _ in sums_b]
        stats.append(mean_ratio(runs_b, idx) - mean_ratio(runs_a, idx))
    stats.sort()
    everything = range(n)
    return {"delta": round(mean_ratio(sums_b, everything) - mean_ratio(sums_a, everything), 5),
            "ci95": [round(stats[int(0.025 * resamples)], 5), round(stats[int(0.975 * resamples) - 1], 5)],
            "n": n, "seeds": [len(sums_a), len(sums_b)]}
