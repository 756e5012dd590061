"""Reading task data: JSONL of chat `messages`, or instruction/response pairs.

Every bad row is reported as `FILE:LINE: reason`; with `on_bad_row: skip` it is counted
and skipped instead.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sa_sft.chat import validate_messages
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.data")

BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass
class TaskData:
    path: Path
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)


def resolve_task_path(spec: str, key: str = "data.task_path") -> Path:
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
    if not path.is_file():
        raise UserError(f"{key}: {spec} does not exist")
    return path


def row_to_messages(row) -> list[dict]:
    """Normalise one row to a list of messages; raises ValueError with the reason."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row:
        response = row.get("response", row.get("output"))
        if not isinstance(row["instruction"], str) or not isinstance(response, str):
            raise ValueError("`instruction` and `response` (or `output`) must be strings")
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise ValueError("expected `messages` or `instruction`/`response` fields")
    problem = validate_messages(messages)
    if problem:
        raise ValueError(problem)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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


class TaskReader:
    """The rows of a task file, validated one line at a time as they are iterated (never all in memory).

    A bad row raises `FILE:LINE: reason`, or with on_bad_row=skip is counted in `skipped`; a file
    with no usable row raises once the end is reached.
    """

    def __init__(self, spec: str, on_bad_row: str = "error", key: str = "data.task_path",
                 max_row_bytes: int = 16 * 2**20):
        self.path = resolve_task_path(spec, key)
        self.on_bad_row, self.key, self.max_row_bytes = on_bad_row, key, max_row_bytes
        self.skipped: list[str] = []

    def __iter__(self):
        self.skipped = []
        prefix = "task" if self.key == "data.task_path" else "external"
        rows = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(bounded_lines(f, self.max_row_bytes), start=1):
                if raw is not None and not raw.strip():
                    continue
                try:
                    if raw is None:
                        raise ValueError(f"line longer than {self.max_row_bytes} bytes (data.max_row_bytes)")
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"not UTF-8 (byte {e.start})") from None
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                    messages = row_to_messages(row)
                except ValueError as e:
                    if self.on_bad_row == "error":
                        raise UserError(f"{self.path}:{line_no}: {e} (set data.on_bad_row=skip to skip such rows)") from None
                    self.skipped.append(f"{self.path}:{line_no}: {e}")
                    continue
                rows += 1
                yield {"id": f"{prefix}-{line_no}", "messages": messages,
                       **({"answer": row["answer"]} if "answer" in row else {})}
        if self.skipped:
            log.warning("skipped %d bad task rows; first: %s", len(self.skipped), self.skipped[0])
        if not rows:
            raise UserError(f"{self.path}: no usable task rows")


def read_task_data(spec: str, on_bad_row: str = "error", key: str = "data.task_path",
                   max_row_bytes: int = 16 * 2**20) -> TaskData:
    reader = TaskReader(spec, on_bad_row, key, max_row_bytes)
    rows = list(reader)
    return TaskData(path=reader.path, rows=rows, skipped=reader.skipped)
