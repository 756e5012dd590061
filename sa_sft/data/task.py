"""Reading task data (and external data): rows in chat `messages`, alpaca or ShareGPT form, from
JSONL, a JSON array, Parquet, a `datasets` save_to_disk folder or `hf:NAME[:SPLIT]` (a hub dataset,
its local cache, or a local folder of data files, through `datasets`).

Rows are read as they are iterated (a line, an array element or a batch of rows at a time, never a
whole file). Every bad row is reported as `FILE:LINE: reason` (Parquet and `datasets`: `FILE:row N:
reason`, N the 0-based row index); with `on_bad_row: skip` it is counted and skipped instead.

Forms (`data.format`; under `auto` each row's own keys decide, so a file may mix them):
  messages  {"messages": [{"role": ..., "content": ...}, ...]}
  alpaca    {"instruction": ..., "input": optional, "output": ..., "system": optional}
            (`response` is read too while `data.columns.response` is `output`: the older pair form)
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system": optional}
`data.columns` maps other field names onto these.
"""
import codecs
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sa_sft.chat import validate_messages
from sa_sft.errors import UserError
from sa_sft.io import sha256_file

log = logging.getLogger("sa_sft.data")

BUILTIN_DIR = Path(__file__).parent / "builtin"

FORMATS = ("auto", "messages", "alpaca", "sharegpt")
# The field names of each form unless data.columns maps others (the keys are data.columns' keys).
DEFAULT_COLUMNS = {"messages": "messages", "conversations": "conversations", "prompt": "instruction",
                   "input": "input", "response": "output", "system": "system", "answer": "answer"}
# ShareGPT's speaker names (LLaMA-Factory's and axolotl's defaults), and the chat names some exports use.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
BATCH_ROWS = 1024  # rows per batch read from Parquet and `datasets` (memory stays bounded by it)


@dataclass
class TaskData:
    path: Path | str
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)


def resolve_task_path(spec: str, key: str = "data.task_path") -> Path:
    """The file or folder a (non-`hf:`) spec names."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        from sa_sft.data.prepared import SOURCES, prepared_path
        if name in SOURCES:
            return prepared_path(name)  # taken from a PyPI package at setup
        path = BUILTIN_DIR / f"{name}.jsonl"
        if not path.exists():
            names = ", ".join(sorted([p.stem for p in BUILTIN_DIR.glob("*.jsonl")] + ["sharegpt"]))
            raise UserError(f"{key}: no built-in task {spec!r} (built-ins: {names})")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{key}: {spec} does not exist")
    return path


def field_name(cols: dict, name: str) -> str:
    """`column`, with the config key that renamed it when it is not the default."""
    mapped = f" (data.columns.{name})" if cols[name] != DEFAULT_COLUMNS[name] else ""
    return f"`{cols[name]}`{mapped}"


def row_form(row: dict, fmt: str, cols: dict) -> tuple[str, str]:
    """(form, field holding the turns or the prompt) of one row. Under `auto` the first field found
    decides: messages, conversations, then the alpaca prompt; a list of turns written as
    `from`/`value` is ShareGPT whichever of the two list fields holds it (both spellings are common)."""
    if fmt == "messages":
        return "messages", cols["messages"]
    if fmt == "sharegpt":
        return "sharegpt", cols["conversations"]
    if fmt == "alpaca":
        return "alpaca", cols["prompt"]
    for name in (cols["messages"], cols["conversations"]):
        turns = row.get(name)
        if turns is not None:
            first = turns[0] if isinstance(turns, list) and turns else None
            if isinstance(first, dict) and "role" not in first and "from" in first:
                return "sharegpt", name
            if isinstance(first, dict) and "from" not in first and "role" in first:
                return "messages", name
            return ("messages" if name == cols["messages"] else "sharegpt"), name
    if row.get(cols["prompt"]) is not None:
        return "alpaca", cols["prompt"]
    keys = ", ".join(map(str, list(row)[:8])) + (", ..." if len(row) > 8 else "")
    raise ValueError(f"expected {field_name(cols, 'messages')}, {field_name(cols, 'conversations')} (ShareGPT) or "
                     f"{field_name(cols, 'prompt')}/{field_name(cols, 'response')} (alpaca) fields; the row has: "
                     f"{keys or 'nothing'} (data.columns maps other names)")


def sharegpt_messages(turns, name: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"`{name}` must be a non-empty list of {{from, value}} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {i} must be an object with `from` and `value` (ShareGPT)")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ValueError(f"turn {i} has unknown ShareGPT role {turn['from']!r} (expected human, gpt or system)")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def row_to_messages(row, fmt: str = "auto", columns: dict | None = None) -> list[dict]:
    """Normalise one row to a list of messages; raises ValueError with the reason."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    return convert_row(row, fmt, {**DEFAULT_COLUMNS, **(columns or {})})[1]


def convert_row(row: dict, fmt: str, cols: dict) -> tuple[str, list[dict]]:
    """(form, messages) of one row; raises ValueError with the reason."""
    form, name = row_form(row, fmt, cols)
    if form == "alpaca":
        prompt, response = row.get(cols["prompt"]), row.get(cols["response"])
        if response is None and cols["response"] == DEFAULT_COLUMNS["response"]:
            response = row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"alpaca rows need string {field_name(cols, 'prompt')} and "
                             f"{field_name(cols, 'response')} fields")
        extra = row.get(cols["input"])
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"{field_name(cols, 'input')} must be a string")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                    {"role": "assistant", "content": response}]
    elif name not in row or row[name] is None:
        raise ValueError(f"no {field_name(cols, 'messages' if form == 'messages' else 'conversations')} "
                         f"field (data.format={fmt})")
    elif form == "sharegpt":
        messages = sharegpt_messages(row[name], name)
    else:
        messages = row[name]
    system = row.get(cols["system"])
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"{field_name(cols, 'system')} must be a string")
        if system.strip() and isinstance(messages, list):
            if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
                raise ValueError(f"both a {field_name(cols, 'system')} field and a system turn")
            messages = [{"role": "system", "content": system}, *messages]
    problem = validate_messages(messages)
    if problem:
        raise ValueError(problem)
    return form, [{"role": m["role"], "content": m["content"]} for m in messages]


def bounded_lines(f, max_bytes: int):
    """(raw line or None when it is longer than max_bytes) for each line, never holding more than
    max_bytes of one line in memory."""
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


# Each reader yields (where, number, row, problem): `where` names the file and line or row for
# messages, `number` makes the row's id, and `problem` (else None) says why the row is unreadable.

def jsonl_rows(path: Path, max_bytes: int):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(bounded_lines(f, max_bytes), start=1):
            if raw is not None and not raw.strip():
                continue
            where, row, problem = f"{path}:{line_no}", None, None
            if raw is None:
                problem = f"line longer than {max_bytes} bytes (data.max_row_bytes)"
            else:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problem = f"not UTF-8 (byte {e.start})"
                except json.JSONDecodeError as e:
                    problem = f"not valid JSON ({e.msg} at column {e.colno})"
                else:
                    if not isinstance(row, dict):
                        problem = "each line must be a JSON object"
            yield where, line_no, row, problem


# Outside strings, the characters that open or close an element; inside, those that end or escape.
JSON_STRUCTURE = re.compile(r'["\\\[\]{}]')


def json_array_rows(path: Path, max_bytes: int, chunk: int = 1 << 20):
    """The elements of a top-level JSON array, one at a time: at most about one element (up to
    max_bytes) is held in memory, never the whole file; a longer element is scanned past and
    reported. A syntax error ends the file (past it the elements cannot be found again), so it
    cannot be skipped as a bad JSONL line can."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, line, eof = "", 0, 1, False  # `line`: the line number of buf[0]
        counted = [0, 1]  # lines are counted once: buf[counted[0]] is on line counted[1]

        def fill() -> None:
            nonlocal buf, eof
            block = f.read(chunk)
            eof = not block
            try:
                buf += utf8.decode(block, final=eof)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line + buf.count(chr(10))}: not UTF-8 (byte {e.start} of a block)") from None

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def at(p: int) -> int:
            if p < counted[0]:
                return line + buf.count("\n", 0, p)
            counted[:] = p, counted[1] + buf.count("\n", counted[0], p)
            return counted[1]

        def drop(p: int) -> None:  # forget buf[:p]
            nonlocal buf, line
            line, buf = at(p), buf[p:]
            counted[:] = 0, line

        def scan_past(p: int) -> int:
            """The end of the element at buf[p] (an object or array), found by counting brackets outside
            strings and dropping what was scanned: an element over max_bytes is never held whole."""
            depth, in_string = 0, False
            while True:
                match = JSON_STRUCTURE.search(buf, p)
                if match is None:
                    if eof:
                        raise UserError(f"{path}:{at(len(buf))}: not valid JSON (the file ends inside an element)")
                    drop(len(buf))
                    fill()
                    p = 0
                    continue
                c, p = match.group(), match.end()
                if c == "\\":
                    if p >= len(buf) and not eof:
                        drop(p - 1)
                        fill()
                        p = 0
                        continue
                    p += 1  # the escaped character
                elif c == '"':
                    in_string = not in_string
                elif not in_string:
                    depth += 1 if c in "[{" else -1
                    if depth == 0:
                        return p

        skip_space()
        if buf[pos:pos + 1] != "[":
            raise UserError(f"{path}:{at(pos)}: a JSON file must hold an array of rows (or be JSONL)")
        pos += 1
        index = 0
        while True:
            skip_space()
            if pos >= len(buf):
                raise UserError(f"{path}:{at(pos)}: not valid JSON (the array is not closed)")
            if buf[pos] == "]" and index == 0:
                return
            if pos > chunk:  # what was read goes, a chunk at a time (per element it would copy the rest each time)
                drop(pos)
                pos = 0
            start = pos
            where, row, problem, too_long = f"{path}:{at(start)}", None, None, False
            while True:
                try:
                    row, end = decoder.raw_decode(buf, start)
                    if end < len(buf) or eof:  # a number at the end of the buffer may go on
                        break
                except json.JSONDecodeError as e:
                    # Where the buffer ends mid-element the error is at its end (or at an open string).
                    cut_short = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")
                    if eof or not cut_short:
                        raise UserError(f"{path}:{at(e.pos)}: not valid JSON ({e.msg}); a JSON array cannot be "
                                        "read past it (JSONL can, with data.on_bad_row=skip)") from None
                    if len(buf) - start > max_bytes and buf[start] in "[{":
                        too_long, end = True, scan_past(start)
                        break
                fill()
            if too_long or (end - start > max_bytes // 4 and len(buf[start:end].encode("utf-8")) > max_bytes):
                row, problem = None, f"array element longer than {max_bytes} bytes (data.max_row_bytes)"
            elif not isinstance(row, dict):
                problem = "each array element must be a JSON object"
            yield where, index, row, problem
            index += 1
            pos = end
            skip_space()
            if buf[pos:pos + 1] == "]":
                return
            if buf[pos:pos + 1] != ",":
                raise UserError(f"{path}:{at(pos)}: not valid JSON (expected `,` or `]` after an array element)")
            pos += 1


def parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):  # a row group at a time at most
            for row in batch.to_pylist():
                yield f"{path}:row {index}", index, row, None
                index += 1
    except (pa.ArrowException, OSError) as e:
        where = f"{path}: not a readable Parquet file" if index == 0 else f"{path}:row {index}: unreadable Parquet data"
        raise UserError(f"{where} ({e})") from None


def dataset_rows(dataset, label: str):
    index = 0
    for batch in dataset.with_format(None).iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield f"{label}:row {index}", index, dict(zip(names, values)), None
            index += 1


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1" or path.suffix == ".parquet"


def starts_with_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    return head.startswith(b"[")


def load_folder(path: Path, key: str):
    """A `datasets` save_to_disk folder: a Dataset, or a DatasetDict's `train` split (or its only one)."""
    import datasets

    is_dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    if not is_dataset and not (path / "dataset_dict.json").is_file():
        raise UserError(f"{key}: {path} is a folder but not a `datasets` save_to_disk folder (no state.json and "
                        f"dataset_info.json, nor dataset_dict.json); a folder of data files reads as hf:{path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder fails in json, pyarrow or datasets itself: one line for all
        raise UserError(f"{key}: {path}: unreadable `datasets` folder ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise UserError(f"{key}: {path} holds the splits {', '.join(splits)} and none is `train`; "
                            f"name one: {path / splits[0]}")
        loaded = loaded["train" if "train" in loaded else splits[0]]
    return loaded


def split_hf_spec(spec: str) -> tuple[str, str]:
    name, sep, split = spec.removeprefix("hf:").rpartition(":")
    return (name, split) if sep else (split, "")


def load_hub(spec: str, key: str):
    """`hf:NAME[:SPLIT]` through `datasets.load_dataset`: a hub dataset (downloaded, or from the
    local cache when offline), or a local folder of data files. The split defaults to `train`."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError, DatasetsError

    name, split = split_hf_spec(spec)
    if not name:
        raise UserError(f"{key}: {spec}: expected hf:NAME or hf:NAME:SPLIT")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except ConnectionError as e:  # offline (or the hub unreachable) and nothing cached
        why = "HF_HUB_OFFLINE=1" if datasets.config.HF_HUB_OFFLINE else str(e).splitlines()[0]
        raise UserError(f"{key}: {spec}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                        f"and no hub reachable ({why})") from None
    except DatasetNotFoundError as e:
        raise UserError(f"{key}: {spec}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # e.g. an unknown split
        hint = " (pick one with hf:NAME:SPLIT)" if "split" in str(e).splitlines()[0].lower() else ""
        raise UserError(f"{key}: {spec}: {str(e).splitlines()[0]}{hint}") from None
    except (DatasetsError, FileNotFoundError, OSError) as e:
        # datasets wraps a bad data file's own error (pyarrow's, json's) in DatasetGenerationError
        why = "; ".join(f"{type(x).__name__}: {str(x).splitlines()[0] if str(x) else ''}"
                        for x in (e, e.__cause__) if x is not None)
        raise UserError(f"{key}: {spec}: could not be loaded ({why})") from None


def folder_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


class TaskReader:
    """The rows of a task source, validated one row at a time as they are iterated (never all in memory).

    A bad row raises `FILE:LINE: reason` (or `FILE:row N: reason`), or with on_bad_row=skip is counted in
    `skipped`; a source with no usable row raises once the end is reached.
    """

    def __init__(self, spec: str, on_bad_row: str = "error", key: str = "data.task_path",
                 max_row_bytes: int = 16 * 2**20, fmt: str = "auto", columns: dict | None = None):
        self.on_bad_row, self.key, self.max_row_bytes, self.format = on_bad_row, key, max_row_bytes, fmt
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        self.skipped: list[str] = []
        self.forms: Counter = Counter()
        self.dataset = None
        if spec.startswith("hf:"):
            self.path, self.kind, self.dataset = spec, "hf", load_hub(spec, key)
        else:
            self.path = resolve_task_path(spec, key)
            if self.path.is_dir():
                self.kind, self.dataset = "folder", load_folder(self.path, key)
            else:
                # By content: Parquet's magic bytes, or a JSON array (a .jsonl file is read as JSONL whatever it holds)
                self.kind = ("parquet" if is_parquet(self.path) else "json" if self.path.suffix != ".jsonl"
                             and starts_with_array(self.path) else "jsonl")

    def fingerprint(self) -> str:
        """What names the content: a file's sha256, a folder's files' sha256, a hub dataset's `datasets` fingerprint."""
        if self.kind == "hf":
            return hashlib.sha256(f"{self.path}\0{self.dataset._fingerprint}".encode()).hexdigest()
        return folder_sha256(self.path) if self.kind == "folder" else sha256_file(self.path)

    def _rows(self):
        if self.kind == "jsonl":
            return jsonl_rows(self.path, self.max_row_bytes)
        if self.kind == "json":
            return json_array_rows(self.path, self.max_row_bytes)
        if self.kind == "parquet":
            import pyarrow.parquet as pq
            try:
                names = pq.read_schema(self.path).names
            except Exception:  # parquet_rows names the problem
                names = None
            self.check_columns(names)
            return parquet_rows(self.path)
        self.check_columns(self.dataset.column_names)
        return dataset_rows(self.dataset, str(self.path))

    def check_columns(self, names: list[str] | None) -> None:
        """Tables have one set of columns for all rows: a form's missing column is named once, not per row."""
        if names is None:
            return
        cols = self.columns
        needed = {"messages": ["messages"], "sharegpt": ["conversations"], "alpaca": ["prompt", "response"],
                  "auto": ["messages", "conversations", "prompt"]}[self.format]
        present = [n for n in needed if cols[n] in names or (n == "response" and cols[n] == "output" and "response" in names)]
        if (self.format == "auto" and not present) or (self.format != "auto" and present != needed):
            missing = [field_name(cols, n) for n in needed if n not in present]
            what = (f"no {' or '.join(missing)} column" if self.format == "auto"
                    else f"no {' and '.join(missing)} column for data.format={self.format}")
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(f"{self.path}: {what} (its columns: {shown or 'none'}; data.columns maps other names)")

    def __iter__(self):
        self.skipped, self.forms = [], Counter()
        prefix = "task" if self.key == "data.task_path" else "external"
        for where, number, row, problem in self._rows():
            try:
                if problem:
                    raise ValueError(problem)
                form, messages = convert_row(row, self.format, self.columns)
            except ValueError as e:
                if self.on_bad_row == "error":
                    raise UserError(f"{where}: {e} (set data.on_bad_row=skip to skip such rows)") from None
                self.skipped.append(f"{where}: {e}")
                continue
            self.forms[form] += 1
            answer = row.get(self.columns["answer"])
            yield {"id": f"{prefix}-{number}", "messages": messages, **({"answer": answer} if answer is not None else {})}
        if self.skipped:
            log.warning("skipped %d bad task rows; first: %s", len(self.skipped), self.skipped[0])
        if not self.forms:
            raise UserError(f"{self.path}: no usable task rows")
        log.debug("%s: %s", self.path, ", ".join(f"{n} {form} rows" for form, n in self.forms.items()))


def read_task_data(spec: str, on_bad_row: str = "error", key: str = "data.task_path",
                   max_row_bytes: int = 16 * 2**20, fmt: str = "auto", columns: dict | None = None) -> TaskData:
    reader = TaskReader(spec, on_bad_row, key, max_row_bytes, fmt, columns)
    rows = list(reader)
    return TaskData(path=reader.path, rows=rows, skipped=reader.skipped)


def open_data(data, key: str = "data.task_path") -> TaskReader:
    """A reader for data.task_path or data.external_path with data.* settings (a DataConfig)."""
    import dataclasses
    spec = data.task_path if key == "data.task_path" else data.external_path
    return TaskReader(spec, data.on_bad_row, key, data.max_row_bytes, data.format, dataclasses.asdict(data.columns))


def read_data(data, key: str = "data.task_path") -> TaskData:
    reader = open_data(data, key)
    rows = list(reader)
    return TaskData(path=reader.path, rows=rows, skipped=reader.skipped)
