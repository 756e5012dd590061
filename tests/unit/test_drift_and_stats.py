"""Weight drift per layer on hand-made checkpoints, and the intervals reported with every score."""
import math

import pytest
import torch
from safetensors.torch import save_file

from sa_sft.errors import UserError
from sa_sft.evaluate.drift import group_of, weight_drift
from sa_sft.evaluate.stats import accuracy, bootstrap_ratio_ci, wilson_interval
from sa_sft.evaluate.suites import check, extract_number


def test_drift_is_per_layer_relative_to_the_base(tmp_path):
    base = {"model.layers.0.w": torch.ones(2, 2), "model.layers.1.w": torch.ones(4), "model.embed_tokens.weight": torch.ones(3)}
    final = {k: v.clone() for k, v in base.items()}
    final["model.layers.1.w"] += torch.tensor([3.0, 4.0, 0.0, 0.0])  # moved by 5, base norm 2
    (tmp_path / "base").mkdir()
    (tmp_path / "final").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file(final, tmp_path / "final" / "model.safetensors")
    drift = weight_drift(tmp_path / "base", tmp_path / "final")
    assert drift["per_group"]["layer.00"] == {"l2": 0.0, "relative": 0.0}
    assert drift["per_group"]["layer.01"] == {"l2": 5.0, "relative": 2.5}
    assert drift["l2"] == 5.0 and drift["relative"] == pytest.approx(5 / math.sqrt(11))
    save_file({"other.w": torch.ones(1)}, tmp_path / "final" / "model.safetensors")
    with pytest.raises(UserError, match="share no tensor names"):
        weight_drift(tmp_path / "base", tmp_path / "final")


def test_group_names():
    assert group_of("model.layers.12.mlp.up_proj.weight") == "layer.12"
    assert group_of("embed_tokens.weight") == "embed" and group_of("lm_head.weight") == "lm_head"


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    result = accuracy([True, False, True, True], chance=0.25)
    assert result["value"] == 0.75 and result["ci95"][0] < 0.75 < result["ci95"][1] and result["chance"] == 0.25


def test_bootstrap_interval_brackets_the_pooled_mean():
    sums, counts = [1.0, 2.0, 3.0, 4.0] * 10, [1, 1, 1, 1] * 10
    low, high = bootstrap_ratio_ci(sums, counts, seed=1)
    assert low < 2.5 < high and high - low < 1.0


def test_numeric_checker_reads_the_final_answer():
    assert extract_number("so 610 - 378 = 232 potted plants.\n#### 232") == 232
    assert extract_number("The answer is 1,250.") == 1250
    assert check("numeric", "#### 232", "232") and not check("numeric", "no idea", "232")
    assert check("exact", " yes ", "yes")


def test_suite_files_are_validated_with_file_and_line(tmp_path):
    from sa_sft.evaluate.suites import load_suite
    path = tmp_path / "quiz.jsonl"
    path.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n{"question": "x", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(UserError, match=rf"{path}:2: needs question, choices"):
        load_suite(f"mc:{path}", 0)
    path.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n')
    suite = load_suite(f"mc:{path}", 0)
    assert suite.name == "quiz" and suite.kind == "mc" and len(suite.rows) == 1
    with pytest.raises(UserError, match="neither a built-in"):
        load_suite("hellaswag", 0)


def test_mmlu_rows_are_parsed_from_the_evals_format():
    from sa_sft.data.prepared import mmlu_rows
    line = '{"topic": "t", "question": "Q?\\nA. one\\nB. two\\nC. three\\nD. four\\nAnswer:", "answer": "C"}'
    assert mmlu_rows(line) == [{"question": "Q?", "choices": ["one", "two", "three", "four"], "answer": 2, "subject": "t"}]


def test_generation_suite_rows_and_checkers(tmp_path):
    from sa_sft.evaluate.suites import check, load_suite
    suite = load_suite("gen:tests/data/suites/arithmetic.jsonl", 0)
    assert suite.kind == "gen" and suite.name == "arithmetic" and len(suite.rows) == 4
    assert check(suite.rows[2]["checker"], "Sure: BANANA!", "banana")  # the user's python: scorer
    assert not check(suite.rows[2]["checker"], "apple", "banana")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "x"}\n{"prompt": "hi"}\n')
    with pytest.raises(UserError, match=rf"{bad}:2: needs answer and a prompt"):
        load_suite(f"gen:{bad}", 0)
    bad.write_text('{"prompt": "hi", "answer": "x", "checker": "fuzzy"}\n')
    with pytest.raises(UserError, match=rf"{bad}:1: checker must be"):
        load_suite(f"gen:{bad}", 0)
    bad.write_text('{"prompt": "hi", "answer": "x"\n')
    with pytest.raises(UserError, match=rf"{bad}:1: not valid JSON"):
        load_suite(f"gen:{bad}", 0)
    with pytest.raises(UserError, match="has no function nope"):
        check("python:tests/data/suites/contains.py:nope", "a", "a")


def test_paired_delta_sees_a_shift_the_separate_intervals_cannot():
    from sa_sft.evaluate.stats import paired_bootstrap_delta, wilson_interval
    # 200 items; model b gets 10 more right than a and none of a's right answers wrong.
    a = [1.0] * 60 + [0.0] * 140
    b = [1.0] * 70 + [0.0] * 130
    change = paired_bootstrap_delta(a, b, [1] * 200, seed=3)
    assert change["delta"] == 0.05 and 0 < change["ci95"][0] < 0.05 < change["ci95"][1]
    assert wilson_interval(70, 200)[0] < wilson_interval(60, 200)[1]  # unpaired intervals overlap
    same = paired_bootstrap_delta(a, a, [1] * 200)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]


def test_in_domain_suite_from_the_held_out_task_rows():
    from sa_sft.config import load_config
    from sa_sft.evaluate.generation import task_suite
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "so 4\n#### 12"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no number"}]}]
    suite = task_suite(load_config("tiny", ["evaluate.task_checker=auto"]), rows)  # builtin:gsm_symbolic
    assert suite.name == "task_accuracy" and [r["answer"] for r in suite.rows] == [12.0]
    assert task_suite(load_config("tiny", ["evaluate.task_checker=none"]), rows) is None
    assert len(task_suite(load_config("tiny", ["evaluate.task_checker=exact"]), rows).rows) == 2


def test_code_suites_need_explicit_permission_and_checkers_are_validated():
    from sa_sft.config import load_config
    with pytest.raises(UserError, match="evaluate.allow_code_execution=true"):
        load_config("tiny", ["evaluate.suites=[humaneval]"])
    with pytest.raises(UserError, match="evaluate.task_checker must be"):
        load_config("tiny", ["evaluate.task_checker=fuzzy"])
