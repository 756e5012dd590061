"""Scale: the duplicate check of generated user turns and the mix stage's tokenization, at 50,000 and
200,000 rows, against the implementations they replaced (benchmarks/legacy.py), in one run.

    .venv/bin/python benchmarks/scale.py [--sizes 50000 200000] [--old-sizes 10000 20000]   (make bench-scale)

Synthetic rows, no model download: the default model's tokenizer (SmolLM2's, prepared offline).
Each case runs in its own process, which reports the seconds of the work alone (the synthetic
data is made before the clock starts), rows/s, and the peak memory of its process tree (RSS of
the process and of any it started, sampled every 20 ms, summed).

  dedup       user turns through the duplicate check, first copy wins (turns in memory; the new
              check's time includes hashing). The turns: free questions over a Zipf vocabulary, a
              share from a few templates with one or two slots (similar but mostly not near
              duplicates), exact copies (case and punctuation changed) and near copies (a word or
              two changed).
  dedup-walk  the new check as the generate stage runs it: the same turns as JSONL shards of 64,
              walked in order (read, hashed, signatures saved next to each shard), then walked
              again the way a resumed run does (signatures read back).
  tokenize-ab the tokenization alone, old and new alternating in one process (see case_tokenize_ab).
  mix         the whole mix stage (`sa-sft mix`) on a run directory of N/2 self-dialogues and a task
              file of N/2 rows: read, held out, mixed at lambda = 1, tokenized with the chat
              template, 2 ranks written. `mix-np1`/`mix-np2` force mix.num_proc.

Prints a table and writes benchmarks/results/scale.json with the machine (CPU flags, cores, load).
Goals on 2 cores: dedup >= 5,000 turns/s, tokenization >= 2,000 rows/s, peak RSS < 2 GiB for both.
"""
import argparse
import functools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("SA_SFT_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = REPO / "benchmarks" / "results" / "scale.json"
GOALS = {"dedup_rows_per_s": 5000, "mix_rows_per_s": 2000, "peak_memory_mib": 2048}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


# ---- synthetic data
@functools.cache
def vocabulary(size: int = 20000) -> list[str]:
    """Real English-ish words: the whole-word entries of the default model's tokenizer vocabulary."""
    from transformers import AutoTokenizer

    from sa_sft.models import resolve_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    words = sorted({t[1:].lower() for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3})
    return random.Random(0).sample(words, min(size, len(words)))


def zipf_words(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    # Zipf-like: word rank r drawn with probability ~ 1/r, as in real text.
    return [vocab[min(int(len(vocab) ** rng.random()) - 1, len(vocab) - 1)] for _ in range(n)]


STARTS = ["how do i", "what is the best way to", "can you explain", "why does", "write a short story about",
          "give me three tips for", "what are the differences between", "help me understand", "is it true that"]
TEMPLATES = [
    "can you explain how {0} works and why it matters for {1} in everyday life",
    "write a short poem about {0} in the style of a {1} with four lines and a simple rhyme",
    "what are the main differences between {0} and {1} and which one should a beginner choose first",
    "give me a step by step plan to learn {0} in thirty days while working full time as a {1}",
]


def user_turns(n: int, seed: int = 0) -> list[str]:
    """Chat-like user turns: 70% free questions, 20% templated, 5% exact copies, 5% near copies."""
    rng = random.Random(seed)
    vocab = vocabulary()
    turns = []
    for i in range(n):
        r = rng.random()
        if turns and r < 0.05:
            turns.append(rng.choice(turns).upper() + "!")  # exact duplicate once normalized
        elif turns and r < 0.10:
            words = rng.choice(turns).split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            turns.append(" ".join(words))
        elif r < 0.30:
            turns.append(rng.choice(TEMPLATES).format(*zipf_words(rng, vocab, 2)))
        else:
            turns.append(f"{rng.choice(STARTS)} {' '.join(zipf_words(rng, vocab, rng.randint(8, 45)))}?")
    return turns


def dialogues(n: int, seed: int, prefix: str) -> list[dict]:
    """Two-turn chats of self-dialogue size: a user turn of ~10-45 words, an answer of ~40-220 words."""
    rng = random.Random(seed)
    vocab = vocabulary()
    out = []
    for i, user in enumerate(user_turns(n, seed)):
        answer = " ".join(zipf_words(rng, vocab, rng.randint(40, 220))).capitalize() + "."
        out.append({"id": f"{prefix}-{i}", "messages": [{"role": "user", "content": user},
                                                       {"role": "assistant", "content": answer}]})
    return out


# ---- cases, each run in a child process
def pss(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) in bytes: proportional set size (a page shared by n processes, e.g. forked
    workers, counts 1/n in each), and its anonymous part (heap, stacks), without the file pages of
    memory-mapped Arrow files, which the kernel drops under memory pressure."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields.get("Pss", 0), fields.get("Pss_Anon", 0)


class PeakMemory:
    """The peak memory of this process tree, sampled every 50 ms: the summed PSS and anonymous PSS
    (see pss) of the process and its descendants; and the CPU seconds (user + system) the tree used."""

    def __init__(self):
        import psutil
        self.proc, self.peak, self.anon, self._stop = psutil.Process(), 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil
        while not self._stop.is_set():
            try:
                sizes = [pss(p.pid) for p in [self.proc, *self.proc.children(recursive=True)]]
                self.peak = max(self.peak, sum(total for total, _ in sizes))
                self.anon = max(self.anon, sum(anon for _, anon in sizes))
            except (psutil.Error, OSError):
                pass
            self._stop.wait(0.05)

    @staticmethod
    def _cpu() -> float:
        import resource
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self):
        self._cpu_start = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = self._cpu() - self._cpu_start


def case_dedup(n: int, impl: str) -> dict:
    turns = user_turns(n)
    with PeakMemory() as rss:
        started = time.perf_counter()
        if impl == "old":
            from legacy import OldDuplicateIndex
            index = OldDuplicateIndex(near_threshold=0.8)
            verdicts = [index.check_and_add(t) for t in turns]
            extra = {}
        else:
            from sa_sft.generate.dedup import DuplicateIndex, Signatures
            index = DuplicateIndex(near_threshold=0.8)
            verdicts = index.check_and_add_all(Signatures.of(turns))
            extra = {"comparisons_per_turn": round(index.comparisons / n, 1), "largest_bucket": index.largest_bucket(),
                     "bands_x_rows": f"{index.bands}x{index.rows}"}
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss": rss, "duplicate": verdicts.count("duplicate"),
            "near_duplicate": verdicts.count("near_duplicate"), **extra}


def case_dedup_walk(n: int, impl: str) -> dict:
    from sa_sft.generate.dedup import DuplicateIndex
    from sa_sft.generate.stage import Selection
    from sa_sft.io import atomic_write_jsonl
    from sa_sft.rundir import RunDir
    turns = user_turns(n)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        shards = (n + 63) // 64
        for k in range(shards):
            atomic_write_jsonl(run.shard(k), [{"id": f"{k}-{i}", "messages": [{"role": "user", "content": t},
                                                                          {"role": "assistant", "content": "ok"}]}
                                              for i, t in enumerate(turns[k * 64:(k + 1) * 64])])
        with PeakMemory() as rss:
            started = time.perf_counter()
            first = Selection(run, n, DuplicateIndex(), None).walk(shards)
            seconds = time.perf_counter() - started
            records, kept = first.shards, first.have
            del first
            started = time.perf_counter()
            again = Selection(run, n, DuplicateIndex(), None).walk(shards)
            resumed = time.perf_counter() - started
        assert again.shards == records
    return {"seconds": seconds, "rss": rss, "kept": kept, "resumed_walk_seconds": round(resumed, 2)}


def case_mix(n: int, impl: str, num_proc: int = 0) -> dict:
    import logging

    from sa_sft.config import load_config
    from sa_sft.io import atomic_write_jsonl
    from sa_sft.rundir import RunDir
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "task.jsonl"
        atomic_write_jsonl(task, [{"messages": d["messages"]} for d in dialogues(n // 2, 1, "task")])
        run = RunDir(Path(tmp) / "run").create()
        stage = run.open_stage("generate", {"synthetic": n})
        rows = dialogues(n - n // 2, 2, "self")
        records = []
        for k in range(0, len(rows), 1024):
            atomic_write_jsonl(run.shard(k // 1024), rows[k:k + 1024])
            records.append(run.shard_record(k // 1024, take=len(rows[k:k + 1024]), skip=[], rows=len(rows[k:k + 1024])))
        stage.finish(shards=records, num_samples=len(rows))
        del rows
        cfg = load_config("demo", [f"output_dir={run.root}", "model.path=default", f"data.task_path={task}",
                                   "data.max_task_samples=0", "data.heldout_task=64", "data.heldout_self=32",
                                   "mix.self_ratio=1.0", "train.ranks=2", "train.max_seq_len=1024",
                                   f"mix.num_proc={num_proc}"])
        with PeakMemory() as rss:
            started = time.perf_counter()
            if impl == "old":
                from legacy import old_mix_run_stage
                manifest = old_mix_run_stage(cfg, run)
            else:
                from sa_sft.mix.stage import inputs, run_stage
                manifest = run_stage(cfg, run, run.open_stage("mix", inputs(cfg, run)))
            seconds = time.perf_counter() - started
    tokens = sum(c["tokens"] for c in manifest["counts"].values())
    return {"seconds": seconds, "rss": rss, "tokens_trained": tokens, "rows_per_rank": manifest["rows_per_rank"]}


def case_tokenize_ab(n: int, impl: str) -> dict:
    """The tokenization alone, old (`tokenize_conversation`, one conversation at a time) and new
    (`ConversationTokenizer`: one render, batched encoding, numpy labels) in one process, both on one
    encoder thread, alternating every 500 conversations, so that other work on the machine slows
    both alike. Checks they agree, then reports each one's CPU and wall time."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    from sa_sft.chat import ConversationTokenizer, tokenize_conversation
    from sa_sft.models import resolve_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    conversations = [d["messages"] for d in dialogues(n, 3, "ab")]
    new = ConversationTokenizer(tokenizer, 1024)
    first = conversations[:200]
    assert [(t.input_ids, t.labels) for t in new(first)] == \
        [(t.input_ids, t.labels) for t in (tokenize_conversation(tokenizer, m, 1024) for m in first)]
    spent = {"old": [0.0, 0.0], "new": [0.0, 0.0]}
    tokens = 0
    run = {"old": lambda chunk: [tokenize_conversation(tokenizer, m, 1024) for m in chunk],
           "new": lambda chunk: new.arrays(chunk)}
    with PeakMemory() as rss:
        for k, start in enumerate(range(0, n, 500)):
            chunk = conversations[start:start + 500]
            for which in (("old", "new") if k % 2 == 0 else ("new", "old")):
                cpu, wall = time.process_time(), time.perf_counter()
                out = run[which](chunk)
                spent[which][0] += time.process_time() - cpu
                spent[which][1] += time.perf_counter() - wall
            tokens += sum(len(ids) for ids, _, _ in out) if which == "new" else sum(len(t.input_ids) for t in out)
    return {"seconds": spent["new"][1], "rss": rss, "tokens_per_row": round(tokens / n, 1),
            "new_cpu_seconds": round(spent["new"][0], 2), "old_cpu_seconds": round(spent["old"][0], 2),
            "old_seconds": round(spent["old"][1], 2), "cpu_speedup": round(spent["old"][0] / spent["new"][0], 2),
            "wall_speedup": round(spent["old"][1] / spent["new"][1], 2),
            "new_rows_per_cpu_s": round(n / spent["new"][0], 1), "old_rows_per_cpu_s": round(n / spent["old"][0], 1),
            "exact_path": new.exact_path}


CASES = {"dedup": case_dedup, "tokenize-ab": case_tokenize_ab, "dedup-walk": case_dedup_walk, "mix": case_mix,
         "mix-np1": lambda n, impl: case_mix(n, impl, 1), "mix-np2": lambda n, impl: case_mix(n, impl, 2)}


def child(name: str, n: int, impl: str, out: str) -> None:
    result = CASES[name](n, impl)
    rss = result.pop("rss")
    result.update(rows=n, seconds=round(result["seconds"], 2), rows_per_s=round(n / result["seconds"], 1),
                  cpu_seconds=round(rss.cpu_seconds, 2), rows_per_cpu_s=round(n / rss.cpu_seconds, 1),
                  peak_memory_mib=round(rss.peak / 2**20, 1), peak_anon_mib=round(rss.anon / 2**20, 1),
                  load_average=list(os.getloadavg()))
    Path(out).write_text(json.dumps(result))


def run_case(name: str, n: int, impl: str, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", name, "--rows", str(n), "--impl", impl, "--out", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"case {name} {impl} {n} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(Path(out.name).read_text())
    row = {"case": name, "impl": impl, **result}
    print(f"| {name} | {impl} | {n:,} | {row['seconds']:.1f} | {row['rows_per_s']:,.0f} | {row['cpu_seconds']:.1f} | "
          f"{row['rows_per_cpu_s']:,.0f} | {row['peak_memory_mib']:,.0f} | {row['peak_anon_mib']:,.0f} | "
          f"{row['load_average'][0]:.1f} |", flush=True)
    return row


def machine() -> dict:
    from sa_sft.hardware import cpu_flags
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cpu_flags": [f for f in FLAGS if f in cpu_flags()], "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50000, 200000], help="rows of the new cases")
    parser.add_argument("--old-sizes", type=int, nargs="+", default=[10000, 20000], help="rows of the old ones (slow)")
    parser.add_argument("--small", type=int, nargs="+", default=[2000, 16000],
                        help="rows at which mix runs with 1 and with 2 processes (mix.num_proc's automatic choice)")
    parser.add_argument("--ab-rows", type=int, default=20000, help="conversations of the old/new tokenization case")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES),
                        help="run only these cases and update them in the existing results file")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--impl", default="new")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rows, args.impl, args.out)

    import datasets
    import tokenizers
    import transformers
    report = {"machine": machine(), "versions": {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
                                                "transformers": transformers.__version__}, "goals": GOALS, "cases": []}
    print("| case | implementation | rows | seconds | rows/s | CPU s | rows/CPU-s | peak PSS MiB | peak anon MiB | load |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Old and new alternate at the old sizes, so that each pair meets about the same load from other work.
    same_size = lambda name: [(name, n, impl) for n in args.old_sizes for impl in ("old", "new")]  # noqa: E731
    plan = [("dedup", n, "new") for n in args.sizes] + same_size("dedup")
    plan += [("dedup-walk", n, "new") for n in args.sizes]
    plan += [("mix", n, "new") for n in args.sizes] + same_size("mix")
    plan += [(f"mix-np{p}", n, "new") for n in args.small for p in (1, 2)]
    plan += [("tokenize-ab", args.ab_rows, "old+new")]
    if args.only:  # update those cases of the last full run
        plan = [step for step in plan if step[0] in args.only]
        report = json.loads(RESULTS.read_text())
        report["cases"] = [c for c in report["cases"] if c["case"] not in args.only]
        report.setdefault("partial_reruns", []).append({"cases": args.only, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                        "load_average_at_start": list(os.getloadavg())})
    for name, n, impl in plan:
        report["cases"].append(run_case(name, n, impl, args.timeout))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())

    def get(name, impl, n):
        return next(c for c in report["cases"] if (c["case"], c["impl"], c["rows"]) == (name, impl, n))

    lo, hi = min(args.sizes), max(args.sizes)
    summary = {}
    for name in ("dedup", "dedup-walk", "mix"):
        summary[f"{name}_time_ratio_{hi}_over_{lo}"] = round(get(name, "new", hi)["seconds"] / get(name, "new", lo)["seconds"], 2)
    old_lo, old_hi = min(args.old_sizes), max(args.old_sizes)
    for name in ("dedup", "mix"):
        summary[f"{name}_old_time_ratio_{old_hi}_over_{old_lo}"] = round(
            get(name, "old", old_hi)["seconds"] / get(name, "old", old_lo)["seconds"], 2)
        for n in args.old_sizes:  # the same rows, back to back
            new_, old_ = get(name, "new", n), get(name, "old", n)
            summary[f"{name}_speedup_at_{n}"] = {"wall": round(old_["seconds"] / new_["seconds"], 2),
                                                 "cpu": round(old_["cpu_seconds"] / new_["cpu_seconds"], 2)}
        summary[f"{name}_rows_per_s_new_{hi}_over_old_{old_hi}"] = round(
            get(name, "new", hi)["rows_per_s"] / get(name, "old", old_hi)["rows_per_s"], 2)
    summary["size_ratio"] = round(hi / lo, 2)
    for n in args.small:
        summary[f"mix_{n}_rows_seconds_np1_np2"] = [get("mix-np1", "new", n)["seconds"], get("mix-np2", "new", n)["seconds"]]
    ab = next(c for c in report["cases"] if c["case"] == "tokenize-ab")
    summary["tokenize_speedup_same_process"] = {"cpu": ab["cpu_speedup"], "wall": ab["wall_speedup"],
                                                "new_rows_per_cpu_s": ab["new_rows_per_cpu_s"],
                                                "old_rows_per_cpu_s": ab["old_rows_per_cpu_s"]}
    mix_tokens = get("mix", "new", hi)["tokens_trained"]
    summary[f"mix_{hi}_tokens_per_s"] = round(mix_tokens / get("mix", "new", hi)["seconds"])
    dedup, mix = get("dedup", "new", hi), get("mix", "new", hi)
    summary["goals_met"] = {
        "dedup_rows_per_s": dedup["rows_per_s"] >= GOALS["dedup_rows_per_s"],
        "mix_rows_per_s": mix["rows_per_s"] >= GOALS["mix_rows_per_s"],
        "dedup_peak_memory": dedup["peak_memory_mib"] < GOALS["peak_memory_mib"],
        "mix_peak_memory": mix["peak_memory_mib"] < GOALS["peak_memory_mib"],
    }
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from sa_sft.io import atomic_write_json
    atomic_write_json(RESULTS, report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
