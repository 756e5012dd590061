"""One rank's training rows, written as an Arrow dataset from the tokenized rows, a chunk at a time.

A rank's rows are samples (or packs of samples) chosen by position from the tokenized dataset;
each chunk is gathered with Arrow's `take` and its columns assembled with Arrow arrays (a pack's
tokens are its samples' tokens laid end to end, which is what `take` over its samples already
gives), so no row passes through Python objects and memory holds one chunk.

The rows and their column types are those `Dataset.from_list` gave the earlier, all-in-memory
version of the stage: `id`, `input_ids`, `labels`, (`source` for unpacked samples), `seq_lens`,
`sources`.
"""
from pathlib import Path

import numpy as np
import pyarrow as pa

CHUNK = 2048  # rows (samples or packs) per Arrow batch


def rank_features(packed: bool):
    from datasets import Features, List, Value
    # input_ids int32: what Dataset.from_list chooses for a column of that name (datasets' optimized int types).
    columns = {"id": Value("string"), "input_ids": List(Value("int32")), "labels": List(Value("int64"))}
    if not packed:
        columns["source"] = Value("string")
    columns.update(seq_lens=List(Value("int64")), sources=List(Value("string")))
    return Features(columns)


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def write_rank_rows(path: Path, tokenized: pa.Table, units: list[list[int]], packed: bool) -> None:
    """Write the rows `units` to an Arrow file: each unit lists the positions (in `tokenized`) of
    the samples of one row, one sample unless packed."""
    features = rank_features(packed)
    schema = features.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(units), CHUNK):
            chunk = units[start:start + CHUNK]
            members = np.fromiter((p for unit in chunk for p in unit), dtype=np.int64)
            per_row = np.fromiter((len(unit) for unit in chunk), dtype=np.int64, count=len(chunk))
            taken = tokenized.take(pa.array(members))
            n_tokens = taken.column("n_tokens").to_numpy()
            row_starts = np.concatenate(([0], np.cumsum(per_row)))  # into the chunk's samples
            token_starts = np.concatenate(([0], np.cumsum(n_tokens)))  # into the chunk's tokens
            ids = taken.column("id").to_pylist()
            member_sources = taken.column("source").combine_chunks()
            columns = {
                "id": pa.array(["+".join(ids[a:b]) for a, b in zip(row_starts[:-1], row_starts[1:])], type=pa.string()),
                "input_ids": _list_array(token_starts[row_starts], taken.column("input_ids").combine_chunks().flatten()),
                "labels": _list_array(token_starts[row_starts], taken.column("labels").combine_chunks().flatten()),
            }
            if not packed:
                columns["source"] = member_sources
            columns["seq_lens"] = _list_array(row_starts, pa.array(n_tokens, type=pa.int64()))
            columns["sources"] = _list_array(row_starts, member_sources)
            writer.write_batch(pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema))


def save_rank(rows_path: Path, out_dir: Path) -> None:
    """The rank's Arrow file as a `datasets` folder (what the trainer's `load_from_disk` reads)."""
    from datasets import Dataset
    Dataset.from_file(str(rows_path)).save_to_disk(str(out_dir))
