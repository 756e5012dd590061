import subprocess
import sys
import time

import pytest

from sa_sft.config import Config, builtin_names, load_config, section_for_results
from sa_sft.errors import UserError


def test_builtins_load_and_validate():
    assert {"demo", "tiny"} <= set(builtin_names())
    for name in ("demo", "tiny"):
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.train.precision in ("bf16", "fp32")  # "auto" is resolved at load


def test_overrides_are_typed():
    cfg = load_config("tiny", ["mix.self_ratio=0.5", "train.max_steps=3", "generate.drop_truncated=true",
                               "output_dir=/tmp/x", "seed=7"])
    assert cfg.mix.self_ratio == 0.5 and isinstance(cfg.mix.self_ratio, float)
    assert cfg.train.max_steps == 3 and cfg.generate.drop_truncated is True
    assert cfg.output_dir == "/tmp/x" and cfg.seed == 7


@pytest.mark.parametrize("override, message", [
    ("train.learning_rat=1", "unknown config key train.learning_rat (did you mean train.learning_rate?)"),
    ("bogus=1", "unknown config key bogus"),
    ("train.max_steps=abc", "config key train.max_steps must be an integer; got 'abc'"),
    ("train.max_steps=1.5", "config key train.max_steps must be an integer"),
    ("mix.self_ratio=-1", "config key mix.self_ratio must be >= 0.0; got -1"),
    ("generate.top_p=1.5", "config key generate.top_p must be <= 1.0; got 1.5"),
    ("train.precision=fp16", "config key train.precision must be one of auto, bf16, fp32"),
    ("generate.drop_truncated=maybe", "config key generate.drop_truncated must be true or false"),
    ("train=3", "config key train must be a mapping"),
    ("novalue", "override 'novalue' must look like key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="no config file or built-in config named 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntrain: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(str(bad))


def test_results_sections_leave_out_resource_keys():
    cfg = load_config("tiny")
    gen = section_for_results(cfg.generate)
    assert "engines" not in gen and "kv_cache_gib" not in gen
    assert "temperature" in gen and "num_samples" in gen


def test_cli_bad_key_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "tiny", "train.nope=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown config key train.nope"]
    assert "Traceback" not in proc.stderr


def test_cli_help_describes_each_subcommand():
    for cmd in ([], ["run"], ["generate"], ["mix"], ["train"], ["evaluate"], ["report"], ["prepare-model"],
                ["prepare-data"], ["slurm"], ["compare"]):
        proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", *cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: sa-sft" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "--help"], capture_output=True, text=True)
    assert "mix.self_ratio" in proc.stdout and "train.max_steps" in proc.stdout


def test_compare_refuses_an_unknown_method_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "compare", "tiny", "--methods", "base,lora"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: compare: unknown method(s) lora")


def test_bad_evaluation_suites_fail_before_any_stage_runs(tmp_path):
    bad = tmp_path / "quiz.jsonl"
    bad.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 7}\n')
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "tiny", f"output_dir={tmp_path / 'run'}",
                           f"evaluate.suites=[mc:{bad}]"], capture_output=True, text=True)
    assert proc.returncode == 2 and time.time() - started < 60
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:1: needs question, choices (list) and answer (index into choices)"
    assert not (tmp_path / "run" / "generate").exists()
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "tiny", f"output_dir={tmp_path / 'run'}",
                           "evaluate.task_checker=python:tests/data/suites/contains.py:missing"], capture_output=True, text=True)
    assert proc.returncode == 2 and "has no function missing" in proc.stderr.strip().splitlines()[-1]
