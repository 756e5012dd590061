"""Weight drift per layer on hand-made checkpoints, and the intervals reported with every score."""
import math

import pytest
import torch
from safetensors.torch import save_file

from sa_sft.errors import UserError
from sa_sft.evaluate.drift import group_of, weight_drift
from sa_sft.evaluate.suites import accuracy, bootstrap_ratio_ci, check, extract_number, wilson_interval


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
    from sa_sft.prepared_data import mmlu_rows
    line = '{"topic": "t", "question": "Q?\\nA. one\\nB. two\\nC. three\\nD. four\\nAnswer:", "answer": "C"}'
    assert mmlu_rows(line) == [{"question": "Q?", "choices": ["one", "two", "three", "four"], "answer": 2, "subject": "t"}]
