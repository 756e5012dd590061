"""The suites that see style drift: IFEval-style instruction following (lm-eval's checkers), the
arithmetic suite, the label checker, the held-out chat prompts and the forgetting config."""
import json

import pytest

from sa_sft.errors import UserError


def test_ifeval_items_are_built_by_lm_eval_and_checked_by_it():
    from sa_sft.data.ifeval import INSTRUCTIONS, build_items, follows

    prompts = [f"Tell me about topic number {i}" for i in range(2 * len(INSTRUCTIONS))]
    rows = build_items(prompts)
    assert rows == build_items(prompts)  # seeded: the same items on every machine
    assert {r["instruction_id_list"][0] for r in rows} == set(INSTRUCTIONS)
    by_id = {r["instruction_id_list"][0]: r for r in rows}
    # Arguments drawn under our constraints: only "at least" relations, small word counts.
    assert by_id["keywords:frequency"]["kwargs"][0]["relation"] == "at least"
    assert by_id["length_constraints:number_words"]["kwargs"][0]["num_words"] <= 100
    assert by_id["combination:repeat_prompt"]["kwargs"][0]["prompt_to_repeat"].startswith("Tell me about")
    assert by_id["detectable_format:title"]["prompt"].endswith("such as <<poem of joy>>.")

    title = by_id["detectable_format:title"]
    assert follows(title, "<<My answer>>\nSome text.") == [True]
    assert follows(title, "Some text without a title.") == [False]
    capital = by_id["change_case:english_capital"]
    assert follows(capital, "THIS IS MY ANSWER IN ENGLISH, ALL IN CAPITAL LETTERS.") == [True]
    assert follows(capital, "This is my answer.") == [False]
    # A one-word answer follows none of the constraints kept: the suite sees a model that stopped writing.
    assert not any(follows(row, "mother") == [True] for row in rows)


def test_ifeval_user_file_is_checked_row_by_row(tmp_path):
    from sa_sft.evaluate.suites import load_suite

    good = {"key": 1, "prompt": "Write a poem. Wrap your entire response with double quotation marks.",
            "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    path = tmp_path / "if.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "instruction_id_list": ["no:such"]}) + "\n")
    with pytest.raises(UserError, match=r"if.jsonl:2: unknown IFEval instruction\(s\) no:such"):
        load_suite(f"ifeval:{path}", 0)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"if.jsonl:2: needs prompt, instruction_id_list and kwargs"):
        load_suite(f"ifeval:{path}", 0)
    path.write_text(json.dumps(good) + "\n")
    suite = load_suite(f"ifeval:{path}", 0)
    assert suite.kind == "ifeval" and suite.name == "if"


def test_ifeval_scoring_keeps_which_instruction_failed():
    from sa_sft.config import load_config
    from sa_sft.evaluate.generation import score_generated
    from sa_sft.evaluate.suites import Suite

    row = {"key": 0, "prompt": "Hi. Wrap your entire response with double quotation marks.",
           "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    result, records = score_generated(load_config("tiny"), Suite("ifeval", "ifeval", [row, row]),
                                      ['"Hello there."', "Hello there."])
    assert result["per_item"] == [1, 0] and result["value"] == 0.5
    assert records[1]["reason"] == "not followed: startend:quotation"


def test_arithmetic_suite_is_builtin_and_numeric():
    from sa_sft.evaluate.suites import check, load_suite

    suite = load_suite("arithmetic", 50)
    assert suite.kind == "gen" and len(suite.rows) == 50
    row = suite.rows[0]
    assert row["checker"] == "numeric" and row["prompt"].endswith("=")
    assert check("numeric", f"The answer is {row['answer']}.", row["answer"])


def test_label_checker_ignores_case_and_surrounding_punctuation():
    from sa_sft.evaluate.suites import check

    assert check("label", " Mother-in-law.", "mother-in-law")
    assert check("label", "SON", "son")
    assert not check("label", "grandson", "son")
    assert not check("label", "Owen is Lucy's son.", "son")


def test_forgetting_task_checker_is_label_and_config_loads():
    from sa_sft.config import load_config
    from sa_sft.data.task import read_task_data
    from sa_sft.evaluate.generation import task_checker

    cfg = load_config("forgetting")
    assert task_checker(cfg) == "label"
    assert cfg.evaluate.chat_heldout > 0 and "ifeval" in cfg.evaluate.suites
    rows = read_task_data(cfg.data.task_path).rows
    answers = {r["messages"][-1]["content"] for r in rows}
    assert len(rows) >= cfg.data.max_task_samples and all(" " not in a for a in answers)


def test_chat_prompts_are_short_plain_and_after_the_sharegpt_rows():
    from sa_sft.data.prepared import chat_prompt_rows, sharegpt_rows

    def conversation(i, text):
        return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": f"answer {i}"}]}

    items = [conversation(i, f"What is the meaning of word number {i}?") for i in range(6)]
    items += [conversation(6, "def f(x): return {x}"), conversation(7, "What is the meaning of word number 5?"),
              conversation(8, "short")]
    text = json.dumps(items)
    assert len(sharegpt_rows(text, 3)) == 3
    assert [r["messages"][0]["content"] for r in sharegpt_rows(text, 2, skip=3)] == [
        "What is the meaning of word number 3?", "What is the meaning of word number 4?"]
    # After the first 3 kept conversations; code, duplicates and too-short prompts left out.
    assert chat_prompt_rows(text, 10, skip=3) == [{"prompt": f"What is the meaning of word number {i}?"}
                                                  for i in (3, 4, 5)]


def test_lora_names_map_back_to_the_base_model():
    from sa_sft.train.lora import export_name

    assert export_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert export_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert export_name("base_model.model.model.norm.weight") == "model.norm.weight"


def test_lora_refuses_freezing_settings():
    from sa_sft.config import load_config

    with pytest.raises(UserError, match="train.lora_rank trains only the adapters"):
        load_config("tiny", ["train.lora_rank=8", "train.freeze_layers=1"])
