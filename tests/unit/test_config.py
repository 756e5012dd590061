import re
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
                ["prepare-data"], ["slurm"], ["compare"], ["slurm-scripts"]):
        proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", *cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: sa-sft" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "--help"], capture_output=True, text=True)
    assert "mix.self_ratio" in proc.stdout and "train.max_steps" in proc.stdout


def test_compare_refuses_an_unknown_method_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "compare", "tiny", "--methods", "base,bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: compare: unknown method 'bogus' (presets: base,")


@pytest.mark.parametrize("methods, message", [
    ("task_only@2", "method 'task_only@2': only sa_sft@LAMBDA and wise_ft@ALPHA take a value"),
    ("task_only,wise_ft", "method 'wise_ft' needs an alpha in [0, 1]"),
    ("wise_ft@0.5", "method wise_ft@0.5 mixes task_only's weights; add task_only to the methods"),
    ("task_only,wise_ft@0.5+seed2", "method wise_ft@0.5+seed2 mixes task_only+seed2's weights"),
    ("base+seed2", "the base model is not trained, so it has no seed"),
    ("task_only,task_only", "a method is listed twice"),
])
def test_compare_method_presets_refuse_bad_combinations(methods, message):
    from sa_sft.compare import run_compare

    with pytest.raises(UserError, match=re.escape(message)):
        run_compare("tiny", [], methods.split(","))


def test_compare_presets_are_config_overrides(tmp_path):
    from sa_sft.compare import method_overrides, needs
    from sa_sft.rundir import CompareDir

    cfg = load_config("tiny", ["train.learning_rate=0.0002"])
    out = CompareDir(tmp_path)
    assert method_overrides("task_only_low_lr", cfg, out) == ["mix.self_ratio=0", "train.learning_rate=2e-05"]
    assert method_overrides("sa_sft@2", cfg, out) == ["mix.self_ratio=2"]
    assert method_overrides("task_only+seed3", cfg, out) == ["mix.self_ratio=0", "train.seed=3"]
    assert method_overrides("wise_ft@0.25+seed3", cfg, out) == [
        "mix.self_ratio=0", f"train.interpolate_from={tmp_path / 'task_only+seed3'}", "train.interpolate_alpha=0.25"]
    assert method_overrides("rewrite", cfg, out)[0] == "generate.strategy=rewrite"
    assert needs("wise_ft@0.5") == "task_only" and needs("sa_sft@2") is None
    # Every preset gives a valid config.
    for method in ("base", "task_only", "task_only_low_lr", "sa_sft", "sa_sft@0.5", "freeze", "external", "rewrite",
                   "wise_ft@0.5", "task_only+seed2"):
        load_config("tiny", method_overrides(method, cfg, out))


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


@pytest.mark.parametrize("text, expected", [("1e-4", 1e-4), ("3E-5", 3e-5), ("5.0e-5", 5e-5), (".5", 0.5),
                                            ("2", 2.0), ("1_000.5", 1000.5)])
def test_floats_as_people_write_them_on_the_command_line_and_in_yaml(tmp_path, text, expected):
    assert load_config("tiny", [f"train.learning_rate={text}"]).train.learning_rate == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  learning_rate: {text}\n")
    assert load_config(str(path)).train.learning_rate == expected


def test_ints_with_underscores_and_non_numbers_refused(tmp_path):
    assert load_config("tiny", ["train.max_steps=1_000"]).train.max_steps == 1000
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1_000\n")
    assert load_config(str(path)).train.max_steps == 1000
    with pytest.raises(UserError, match="train.learning_rate must be a number; got 'fast'"):
        load_config("tiny", ["train.learning_rate=fast"])
    with pytest.raises(UserError, match="train.max_steps must be an integer; got 1.5"):
        load_config("tiny", ["train.max_steps=1.5"])
