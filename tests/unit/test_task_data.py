import json

import pytest

from sa_sft.data.task import read_task_data
from sa_sft.errors import UserError


def write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return str(path)


GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
GOOD_PAIR = json.dumps({"instruction": "Add 2 and 3.", "response": "5"})


def test_reads_chat_and_instruction_rows(tmp_path):
    data = read_task_data(write(tmp_path / "t.jsonl", [GOOD_CHAT, "", GOOD_PAIR]))
    assert [r["messages"][-1]["content"] for r in data.rows] == ["hello", "5"]
    assert data.rows[1]["messages"][0] == {"role": "user", "content": "Add 2 and 3."}


def test_builtin_demo_task():
    data = read_task_data("builtin:gsm_symbolic")
    assert len(data.rows) > 900 and "####" in data.rows[0]["messages"][-1]["content"]


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "x"}), "expected `messages`, `conversations` (ShareGPT) or `instruction`/`output` (alpaca) fields; the row has: text"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}), "empty assistant turn"),
    (b"\xff\xfe bad bytes\n", "not UTF-8"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, reason):
    path = write(tmp_path / "bad.jsonl", [GOOD_CHAT, line])
    with pytest.raises(UserError) as err:
        read_task_data(path)
    assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path):
    data = read_task_data(write(tmp_path / "t.jsonl", [GOOD_CHAT, "{bad", GOOD_PAIR]), on_bad_row="skip")
    assert len(data.rows) == 2 and len(data.skipped) == 1 and ":2:" in data.skipped[0]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data.task_path: .* does not exist"):
        read_task_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="no usable task rows"):
        read_task_data(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(UserError, match="no built-in task"):
        read_task_data("builtin:nope")
