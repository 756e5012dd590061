"""The mix stage's rows as Arrow files, tokenized with Hugging Face `datasets`' `map` over processes.

Every candidate row (task rows, self-dialogues, external rows, in that order) is written as it is
read to one Arrow file, one batch at a time, and memory-mapped as a `Dataset`; `map` tokenizes it
in `num_proc` processes, each writing its share as Arrow next to it. No process holds every row:
what the stage keeps in memory is per row a few integers (order, lengths), never its text.
"""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from sa_sft.chat import IGNORE_INDEX, ConversationTokenizer

SOURCES = ("task", "self", "external")
# The input rows: the row as read (what held-out files get back) and, for rewrites, the messages to train on.
SOURCE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("row", pa.string()),
                           ("rewrite", pa.string())])
WRITE_BATCH = 1024
# Rows each tokenizing process must get before another process can pay for its start.
ROWS_PER_PROCESS = 4096


def tokenized_features():
    from datasets import Features, List, Value
    return Features({"id": Value("string"), "source": Value("string"), "input_ids": List(Value("int32")),
                     "labels": List(Value("int64")), "n_tokens": Value("int64"), "n_loss": Value("int64"),
                     "truncated": Value("bool")})


class SourceWriter:
    """Appends rows to the Arrow file of candidate rows, a batch at a time; counts them per source."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.counts = dict.fromkeys(SOURCES, 0)
        self._batch: list[tuple] = []
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SOURCE_SCHEMA)

    def add(self, source: str, row: dict, rewrite: list[dict] | None = None) -> None:
        self._batch.append((row["id"], source, json.dumps(row, ensure_ascii=False),
                            None if rewrite is None else json.dumps(rewrite, ensure_ascii=False)))
        self.counts[source] += 1
        if len(self._batch) >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            columns = [pa.array(list(column), type=field.type) for column, field in zip(zip(*self._batch), SOURCE_SCHEMA)]
            self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=SOURCE_SCHEMA))
            self._batch = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> "SourceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.cache
def _tokenizer(model_path: str, trust_remote_code: bool):
    """One tokenizer per process (map's worker processes load their own)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


class TokenizeRows:
    """map's function: a batch of candidate rows to their tokens and labels (chat.ConversationTokenizer,
    i.e. exactly chat.tokenize_conversation), lengths, loss-token counts and truncation flags.
    Holds only settings, so it pickles to worker processes cheaply."""

    def __init__(self, model_path: str, trust_remote_code: bool, max_len: int, train_on_prompt: bool,
                 one_thread: bool = False):
        self.args = (str(model_path), trust_remote_code)
        self.max_len, self.train_on_prompt = max_len, train_on_prompt
        # In map's worker processes: the Rust encoder on one thread each, the processes being the parallelism.
        self.one_thread = one_thread
        self._converter = None

    def __getstate__(self):
        return {**self.__dict__, "_converter": None}

    def __call__(self, batch: dict) -> dict:
        if self._converter is None:
            if self.one_thread:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the encoder at each call
            self._converter = ConversationTokenizer(_tokenizer(*self.args), self.max_len, self.train_on_prompt)
        conversations = [json.loads(rewrite) if rewrite is not None else json.loads(row)["messages"]
                         for row, rewrite in zip(batch["row"], batch["rewrite"])]
        out = self._converter.arrays(conversations)
        return {"input_ids": [ids.astype(np.int32) for ids, _, _ in out], "labels": [labels for _, labels, _ in out],
                "n_tokens": [len(ids) for ids, _, _ in out],
                "n_loss": [int((labels != IGNORE_INDEX).sum()) for _, labels, _ in out],
                "truncated": [truncated for _, _, truncated in out]}


def resolve_num_proc(setting: int, rows: int) -> int:
    """mix.num_proc, or for 0: a process per idle core (the cores this process may use less the
    1-minute load average), each with at least ROWS_PER_PROCESS rows.

    Measured (benchmarks/scale.py, 2 cores, 16,000 rows): with both cores idle 2 processes took 12.8 s
    and 1 took 17.4 s; with another program keeping one core busy 1 process took 20.1 s and 2 took
    26.9 s (a second process costs CPU to start, and then only competes for the same core).
    Results do not depend on it: map keeps the rows in order whatever the number of processes."""
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = round(cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(idle, cores, rows // ROWS_PER_PROCESS))


def tokenize_sources(path: Path, fn: TokenizeRows, num_proc: int):
    """The candidate rows of `path` tokenized, in order, as a memory-mapped Dataset (Arrow files next to `path`)."""
    from datasets import Dataset
    rows = Dataset.from_file(str(path))
    if num_proc > 1:
        _tokenizer(*fn.args)  # loaded (and transformers imported) once here; forked workers inherit it
    return rows.map(fn, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=["row", "rewrite"], features=tokenized_features(),
                    load_from_cache_file=False, desc="mix: tokenize")
