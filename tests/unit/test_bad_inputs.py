"""Every stage on every bad input of tests/data/bad/: exit 2, one line naming the file:line or
the config key, no traceback, nothing written, in seconds."""
import json
import shutil
import time
from pathlib import Path

import pytest

from sa_sft.cli import main
from sa_sft.errors import UserError
from sa_sft.models import prepare_tiny_model

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
STAGES = ("run", "generate", "mix", "train", "evaluate")

TASK_CASES = {
    "malformed.jsonl": ":2: not valid JSON",
    "wrong_schema.jsonl": ":2: expected `messages`, `conversations` (ShareGPT) or `instruction`/`output` (alpaca) fields",
    "unknown_role.jsonl": ":2: message 0 has unknown role 'narrator'",
    "empty.jsonl": ": no usable task rows",
    "non_utf8.jsonl": ":2: not UTF-8",
    "enormous_line.jsonl": ":2: line longer than 4096 bytes (data.max_row_bytes)",
    "messages_not_a_list.jsonl": ":2: `messages` must be a non-empty list",
    "no_assistant_turn.jsonl": ":2: no assistant turn to learn from",
    "not_an_object.jsonl": ":2: each line must be a JSON object",
    "sharegpt_unknown_from.json": ":2: turn 1 has unknown ShareGPT role 'bot' (expected human, gpt or system)",
    "alpaca_no_output.jsonl": ":2: alpaca rows need string `instruction` and `output` fields",
    "broken_array.json": ":2: not valid JSON (Expecting ',' delimiter)",
}
# A syntax error inside a JSON array hides where the next element starts: it cannot be skipped.
UNSKIPPABLE = {"empty.jsonl", "broken_array.json"}

CONFIG_CASES = {
    "unknown_key.yaml": "unknown config key train.learning_rte (did you mean train.learning_rate?)",
    "wrong_type.yaml": "train.ranks",
    "negative_value.yaml": "train.learning_rate",
    "fraction_over_one.yaml": "generate.top_p",
    "not_yaml.yaml": "not_yaml.yaml:4: not valid YAML",
    "section_not_a_mapping.yaml": "config key model must be a mapping",
    "odd_turns.yaml": "config key generate.turns must be even",
    "too_many_ranks.yaml": "config key train.ranks (4096) is more than the",
}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, expected: str, out_dir: Path) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not out_dir.exists(), "a refused run wrote into its output directory"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", sorted(TASK_CASES))
def test_bad_task_data(name, stage, tmp_path, capsys):
    path = BAD / "task" / name
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, "tiny", f"output_dir={out}", f"data.task_path={path}", "data.max_row_bytes=4096")
    assert_refused(code, err, f"{path}{TASK_CASES[name]}", out)


def test_bad_rows_can_be_skipped_and_counted_instead(tmp_path):
    from sa_sft.data.task import read_task_data
    for name in set(TASK_CASES) - UNSKIPPABLE:
        data = read_task_data(str(BAD / "task" / name), on_bad_row="skip", max_row_bytes=4096)
        assert len(data.rows) == 1 and len(data.skipped) == 1 and ":2: " in data.skipped[0]
    with pytest.raises(UserError, match=":2: not valid JSON"):
        read_task_data(str(BAD / "task" / "broken_array.json"), on_bad_row="skip")


@pytest.mark.parametrize("stage", STAGES)
def test_bad_external_data_names_its_key(stage, tmp_path, capsys):
    path = BAD / "task" / "unknown_role.jsonl"
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, "tiny", f"output_dir={out}", f"data.external_path={path}", "mix.external_ratio=0.5")
    assert_refused(code, err, f"{path}:2: message 0 has unknown role", out)


def make_format_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """Bad inputs in the formats beyond JSONL, written with the real libraries: case -> (overrides, what
    the error line holds). hf: and hub model ids rely on HF_HUB_OFFLINE=1 (tests/conftest.py): nothing
    is downloaded, and the names are ones no cache holds."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
    bad = {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "upon"}]}
    pq.write_table(pa.Table.from_pylist([good, good, good, bad, good]), root / "bad_row.parquet", row_group_size=2)
    alpaca = [{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]
    pq.write_table(pa.Table.from_pylist(alpaca), root / "alpaca.parquet")
    (root / "alpaca.jsonl").write_text(json.dumps(alpaca[0]) + "\n")
    (root / "not.parquet").write_text(json.dumps(good) + "\n")
    datasets.Dataset.from_list([good, bad]).save_to_disk(str(root / "bad_row_dataset"))
    shutil.copytree(root / "bad_row_dataset", root / "damaged_dataset")
    (root / "damaged_dataset" / "state.json").write_text('{"_data_files": [')
    (root / "plain_folder").mkdir()
    (root / "plain_folder" / "train.jsonl").write_text(json.dumps(good) + "\n")
    return {
        "parquet_bad_row": ([f"data.task_path={root / 'bad_row.parquet'}"],
                            f"{root / 'bad_row.parquet'}:row 3: message 0 has unknown role 'narrator'"),
        "parquet_missing_mapped_column": (
            [f"data.task_path={root / 'alpaca.parquet'}", "data.format=alpaca", "data.columns.prompt=question"],
            f"{root / 'alpaca.parquet'}: no `question` (data.columns.prompt) column for data.format=alpaca"),
        "jsonl_missing_mapped_column": (
            [f"data.task_path={root / 'alpaca.jsonl'}", "data.columns.prompt=question"],
            f"{root / 'alpaca.jsonl'}:1: expected `messages`, `conversations` (ShareGPT) or `question` (data.columns.prompt)"),
        "not_parquet": ([f"data.task_path={root / 'not.parquet'}"], f"{root / 'not.parquet'}: not a readable Parquet file"),
        "dataset_folder_bad_row": ([f"data.task_path={root / 'bad_row_dataset'}"],
                                   f"{root / 'bad_row_dataset'}:row 1: message 0 has unknown role 'narrator'"),
        "damaged_dataset_folder": ([f"data.task_path={root / 'damaged_dataset'}"],
                                   f"data.task_path: {root / 'damaged_dataset'}: unreadable `datasets` folder"),
        "not_a_dataset_folder": ([f"data.task_path={root / 'plain_folder'}"],
                                 f"data.task_path: {root / 'plain_folder'} is a folder but not a `datasets` save_to_disk folder"),
        "hf_not_cached": (["data.task_path=hf:sa-sft-tests/not-cached"],
                          "data.task_path: hf:sa-sft-tests/not-cached: not in the local datasets cache"),
        "hf_external_not_cached": (["data.external_path=hf:sa-sft-tests/not-cached:test", "mix.external_ratio=0.5"],
                                   "data.external_path: hf:sa-sft-tests/not-cached:test: not in the local datasets cache"),
        "hub_model_not_cached": (["model.path=sa-sft-tests/not-cached"],
                                 "model.path: sa-sft-tests/not-cached is not a local folder, not in the Hugging Face cache"),
    }


FORMAT_CASES = ("parquet_bad_row", "parquet_missing_mapped_column", "jsonl_missing_mapped_column", "not_parquet",
                "dataset_folder_bad_row", "damaged_dataset_folder", "not_a_dataset_folder", "hf_not_cached",
                "hf_external_not_cached", "hub_model_not_cached")


@pytest.fixture(scope="module")
def format_cases(tmp_path_factory):
    return make_format_cases(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", FORMAT_CASES)
def test_bad_inputs_in_other_formats(case, stage, format_cases, tmp_path, capsys):
    overrides, expected = format_cases[case]
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, "tiny", f"output_dir={out}", *overrides)
    assert_refused(code, err, expected, out)


def test_format_cases_are_all_run(format_cases):
    assert set(format_cases) == set(FORMAT_CASES)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config(name, stage, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, str(BAD / "config" / name), f"output_dir={out}")
    assert_refused(code, err, CONFIG_CASES[name], out)


SUITE_CASES = {
    "mc:{bad}/suites/mc_answer_out_of_range.jsonl": "mc_answer_out_of_range.jsonl:2: needs question, choices",
    "gen:{bad}/suites/gen_no_answer.jsonl": "gen_no_answer.jsonl:2: needs answer",
    "hellaswag": "neither a built-in",
    "mc:{bad}/suites/missing.jsonl": "missing.jsonl does not exist",
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("spec", sorted(SUITE_CASES))
def test_bad_evaluation_suites(spec, stage, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, "tiny", f"output_dir={out}", f"evaluate.suites=[{spec.format(bad=BAD)}]")
    assert_refused(code, err, SUITE_CASES[spec], out)


def break_model(kind: str, root: Path) -> tuple[Path, str]:
    model = root / kind
    shutil.copytree(prepare_tiny_model(), model)
    if kind == "no_chat_template":
        (model / "chat_template.jinja").unlink()
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        return model, "has no chat template"
    if kind == "no_tokenizer":
        (model / "tokenizer.json").unlink()
        return model, "has no tokenizer"
    if kind == "pickled_weights":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
        return model, "only pytorch_model.bin: sa-sft does not load pickled weights"
    if kind == "tokenizer_mismatch":
        config = json.loads((model / "config.json").read_text())
        config["vocab_size"] = 1000
        (model / "config.json").write_text(json.dumps(config))
        return model, "tokenizer and model do not match"
    if kind == "unreadable_config":
        (model / "config.json").write_text('{"model_type": "llama",')
        return model, "config.json is not valid JSON"
    if kind == "not_a_model":
        shutil.rmtree(model)
        model.mkdir()
        return model, "has no config.json"
    raise AssertionError(kind)


MODEL_CASES = ("no_chat_template", "no_tokenizer", "pickled_weights", "tokenizer_mismatch", "unreadable_config", "not_a_model")


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: break_model(kind, root) for kind in MODEL_CASES}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", MODEL_CASES)
def test_bad_model_folders(kind, stage, broken_models, tmp_path, capsys):
    model, expected = broken_models[kind]
    out = tmp_path / "run"
    code, err = run_cli(capsys, stage, "tiny", f"output_dir={out}", f"model.path={model}")
    assert_refused(code, err, f"model.path: {model}", out)
    assert expected in err.strip().splitlines()[-1]


def test_refusals_take_seconds(tmp_path, capsys):
    started = time.time()
    code, _ = run_cli(capsys, "run", "tiny", f"output_dir={tmp_path / 'run'}", f"data.task_path={BAD / 'task' / 'malformed.jsonl'}")
    assert code == 2 and time.time() - started < 30
