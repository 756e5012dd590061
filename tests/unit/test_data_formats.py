"""Task data in every container (JSONL, JSON array, Parquet, `datasets` save_to_disk folders, hf:) and
every row form (messages, alpaca, ShareGPT, renamed columns), written with the real libraries and read
back into the same conversations."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sa_sft.config import load_config
from sa_sft.data.task import TaskReader, json_array_rows, read_data, read_task_data
from sa_sft.errors import UserError
from sa_sft.pipeline.preflight import preflight

REPO = Path(__file__).resolve().parents[2]

# The conversations every file below holds: alpaca can say a system prompt and one exchange.
EXPECTED = [
    [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Translate to French.\n\nGood morning"}, {"role": "assistant", "content": "Bonjour"}],
]
ANSWERS = ["4", "blue", "bonjour"]
ALPACA = [  # every row has every key: Arrow takes a table's columns from its rows
    {"instruction": "What is 2 + 2?", "input": "", "output": "4", "system": "Answer with a number."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": ""},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "system": ""},
]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def rows_in(form: str) -> list[dict]:
    if form == "messages":
        rows = [{"messages": conv} for conv in EXPECTED]
    elif form == "alpaca":
        rows = [dict(row) for row in ALPACA]
    else:
        rows = [{"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in conv]}
                for conv in EXPECTED]
    return [{**row, "answer": answer} for row, answer in zip(rows, ANSWERS)]


def write(container: str, rows: list[dict], path: Path) -> str:
    """`rows` in a container; returns the data.task_path spec."""
    if container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif container == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=2))  # pretty-printed, as people keep JSON
    elif container == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
    elif container == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif container == "dataset_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
    return str(path)


CONTAINERS = ("jsonl", "json", "parquet", "dataset", "dataset_dict")
FORMS = ("messages", "alpaca", "sharegpt")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_in_every_container_reads_the_same(form, container, tmp_path):
    spec = write(container, rows_in(form), tmp_path / "task")
    for fmt in ("auto", form):
        data = read_task_data(spec, fmt=fmt)
        assert [row["messages"] for row in data.rows] == EXPECTED, fmt
        assert [row["answer"] for row in data.rows] == ANSWERS
        assert len({row["id"] for row in data.rows}) == 3


def test_renamed_columns_through_config_overrides(tmp_path):
    """data.columns.* maps other names, set as people set any key: on the command line."""
    renamed = [{"question": r["instruction"], "context": r["input"], "solution": r["output"], "persona": r["system"],
                "gold": answer} for r, answer in zip(ALPACA, ANSWERS)]
    mapping = ["data.columns.prompt=question", "data.columns.input=context", "data.columns.response=solution",
               "data.columns.system=persona", "data.columns.answer=gold"]
    for container in ("jsonl", "parquet", "dataset"):
        spec = write(container, renamed, tmp_path / f"renamed_{container}")
        cfg = load_config("tiny", [f"data.task_path={spec}", *mapping])
        assert cfg.data.columns.prompt == "question"
        data = read_data(cfg.data)
        assert [row["messages"] for row in data.rows] == EXPECTED, container
        assert [row["answer"] for row in data.rows] == ANSWERS
    saved = tmp_path / "config.yaml"  # as the run directory keeps it, and reads it back
    saved.write_text(cfg.to_yaml())
    assert load_config(str(saved)).data.columns == cfg.data.columns
    preflight(cfg, ["generate", "mix"])  # what every stage checks first accepts it
    chats = [{"chat": conv} for conv in EXPECTED]
    dialogs = [{"dialog": row["conversations"]} for row in rows_in("sharegpt")]
    for name, rows, key in (("chat", chats, "messages"), ("dialog", dialogs, "conversations")):
        spec = write("parquet", rows, tmp_path / name)
        cfg = load_config("tiny", [f"data.task_path={spec}", f"data.columns.{key}={name}"])
        assert [row["messages"] for row in read_data(cfg.data).rows] == EXPECTED


def test_auto_reads_each_row_by_its_fields(tmp_path):
    """Turns spelled `from`/`value` are ShareGPT under either list name, `role`/`content` are messages;
    a file may mix forms, and the older {instruction, response} pair still reads."""
    sharegpt = rows_in("sharegpt")
    rows = [{"messages": sharegpt[0]["conversations"]}, {"conversations": EXPECTED[1]},
            {"instruction": "Translate to French.", "input": "Good morning", "response": "Bonjour"}]
    spec = write("jsonl", rows, tmp_path / "mixed")
    assert [row["messages"] for row in read_task_data(spec).rows] == EXPECTED


def test_format_override_holds_every_row_to_one_form(tmp_path):
    spec = write("jsonl", rows_in("messages"), tmp_path / "chat")
    with pytest.raises(UserError) as err:
        read_task_data(spec, fmt="alpaca")
    assert str(err.value).startswith(f"{spec}:1: alpaca rows need string `instruction` and `output` fields")
    spec = write("json", rows_in("sharegpt"), tmp_path / "sharegpt")
    with pytest.raises(UserError, match=r":2: no `messages` field \(data.format=messages\)"):
        read_task_data(spec, fmt="messages")
    with pytest.raises(UserError, match="config key data.format must be one of auto, messages, alpaca, sharegpt"):
        load_config("tiny", ["data.format=openai"])
    with pytest.raises(UserError, match=r"unknown config key data.columns.promt \(did you mean data.columns.prompt\?\)"):
        load_config("tiny", ["data.columns.promt=question"])


@pytest.mark.parametrize("container", ("parquet", "dataset"))
def test_bad_rows_of_tables_name_the_row_index(container, tmp_path):
    rows = rows_in("sharegpt")
    rows.insert(2, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}],
                    "answer": "x"})
    spec = write(container, rows, tmp_path / "task")
    with pytest.raises(UserError) as err:
        read_task_data(spec)
    assert str(err.value).startswith(f"{spec}:row 2: turn 1 has unknown ShareGPT role 'bot'")
    data = read_task_data(spec, on_bad_row="skip")
    assert [row["messages"] for row in data.rows] == EXPECTED
    assert len(data.skipped) == 1 and data.skipped[0].startswith(f"{spec}:row 2: ")


def test_json_array_is_streamed_element_by_element(tmp_path):
    """Read with a 7-character buffer refill the elements come out whole, with the line each starts on;
    bad elements name their line and can be skipped; a syntax error ends the file with its line."""
    rows = rows_in("alpaca") * 3 + [[1, 2], {"instruction": "x" * 5000, "output": "y"}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows, indent=1))
    read = list(json_array_rows(path, max_bytes=4096, chunk=7))
    assert [row for _, _, row, problem in read if not problem] == rows_in("alpaca") * 3
    assert [problem for *_, problem in read][-2:] == ["each array element must be a JSON object",
                                                      "array element longer than 4096 bytes (data.max_row_bytes)"]
    lines = path.read_text().splitlines()
    for where, _, _, _ in read:  # each element starts on the line named
        assert lines[int(where.rsplit(":", 1)[1]) - 1].strip() in ("{", "[")
    data = read_task_data(str(path), on_bad_row="skip", max_row_bytes=4096)
    assert len(data.rows) == 9 and len(data.skipped) == 2
    path.write_text('[\n {"messages": []},\n {"messages": [}\n]')
    with pytest.raises(UserError, match=rf"^{path}:3: not valid JSON"):
        read_task_data(str(path), on_bad_row="skip")
    path.write_text('  [ ]  ')
    with pytest.raises(UserError, match="no usable task rows"):
        read_task_data(str(path))


def test_dataset_dict_without_a_train_split_names_one(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows_in("messages")),
                          "b": datasets.Dataset.from_list(rows_in("messages"))}).save_to_disk(str(folder))
    with pytest.raises(UserError, match=f"holds the splits a, b and none is `train`; name one: {folder / 'a'}"):
        read_task_data(str(folder))
    assert [row["messages"] for row in read_task_data(str(folder / "b")).rows] == EXPECTED


def test_fingerprints_follow_the_content(tmp_path):
    for container in ("jsonl", "parquet", "dataset"):
        spec = write(container, rows_in("messages"), tmp_path / container)
        before = TaskReader(spec).fingerprint()
        assert TaskReader(spec).fingerprint() == before
        if Path(spec).is_dir():
            shutil.rmtree(spec)
        write(container, rows_in("messages")[:2], tmp_path / container)
        assert TaskReader(spec).fingerprint() != before, container


HF_SCRIPT = r"""
import json, sys
from datasets.packaged_modules.json.json import Json
from sa_sft.data.task import read_task_data, TaskReader
from sa_sft.errors import UserError
folder = sys.argv[1]
# What a hub download leaves in HF_DATASETS_CACHE (NAME/default/VERSION/HASH/*.arrow), written by datasets'
# own builder from local files: offline, load_dataset("NAME") finds it there as it would a hub data set.
Json(dataset_name="sa_sft_test_tasks", config_name="default", config_id="default",
     data_files={"train": [folder + "/train.jsonl"]}, hash="0" * 16).download_and_prepare()
out = {}
for spec in ("hf:" + folder, "hf:" + folder + ":test", "hf:sa_sft_test_tasks", "hf:sa-sft-tests/not-cached",
             "hf:" + folder + ":validation"):
    try:
        out[spec] = [row["messages"] for row in read_task_data(spec).rows]
    except UserError as e:
        out[spec] = str(e)
out["fingerprint"] = TaskReader("hf:sa_sft_test_tasks").fingerprint() == TaskReader("hf:sa_sft_test_tasks").fingerprint()
print(json.dumps(out))
"""


def test_hf_datasets_from_a_local_folder_and_the_offline_cache(tmp_path):
    """hf:DIR (load_dataset on a folder of data files, splits from file names), hf:NAME from the datasets
    cache with HF_HUB_OFFLINE=1, and the one-line error for a name no cache holds. In a child process so
    that HF_DATASETS_CACHE is this test's own."""
    folder = tmp_path / "data"
    folder.mkdir()
    write("jsonl", rows_in("alpaca"), folder / "train")
    write("jsonl", rows_in("alpaca")[:1], folder / "test")  # datasets wants one file type and schema for all splits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(folder)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out[f"hf:{folder}"] == EXPECTED
    assert out[f"hf:{folder}:test"] == EXPECTED[:1]
    assert out["hf:sa_sft_test_tasks"] == EXPECTED
    assert out["hf:sa-sft-tests/not-cached"] == (
        f"data.task_path: hf:sa-sft-tests/not-cached: not in the local datasets cache ({tmp_path / 'cache'}) "
        "and no hub reachable (HF_HUB_OFFLINE=1)")
    assert out[f"hf:{folder}:validation"].startswith(f"data.task_path: hf:{folder}:validation: Unknown split")
    assert out["fingerprint"] is True


def test_hub_model_ids_resolve_through_the_cache_only(tmp_path, tiny_model):
    """model.path=ORG/NAME: a snapshot in the Hugging Face cache's layout (refs/main -> snapshots/COMMIT)
    is used offline; an id the cache lacks fails in one line, before any stage. Never downloads."""
    repo = tmp_path / "hub" / "models--sa-sft-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from sa_sft.models import resolve_model, config_folder\n"
            "print(resolve_model('sa-sft-tests/tiny')); print(config_folder('sa-sft-tests/tiny'))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(repo / "snapshots" / commit)] * 2
    result = subprocess.run([sys.executable, "-m", "sa_sft.cli", "plan", "tiny", "model.path=sa-sft-tests/missing"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.path: sa-sft-tests/missing is not a local folder, not in the Hugging Face cache "
        f"({tmp_path / 'hub'}), and no hub is reachable (HF_HUB_OFFLINE=1)")
