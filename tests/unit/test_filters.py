"""Each generation filter on crafted dialogues (the duplicate check: test_dedup.py)."""
import json

from sa_sft.config import GenerateConfig
from sa_sft.generate.filters import ContaminationIndex, mark_truncated, rejection_reason, repeated_ngram_fraction

S = GenerateConfig(min_turn_chars=3)


def dialogue(user="How do I boil an egg?", answer="Put it in boiling water for nine minutes.", finish=("stop", "stop")):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "finish_reasons": list(finish)}


def test_clean_dialogue_passes():
    assert rejection_reason(dialogue(), S) is None


def test_truncation():
    cut_answer = dialogue(finish=("stop", "length"))
    assert rejection_reason(cut_answer, S) is None  # kept, without end-of-turn (see mark_truncated)
    assert rejection_reason(cut_answer, GenerateConfig(min_turn_chars=3, keep_truncated_answers=False)) == "truncated_assistant"
    assert rejection_reason(cut_answer, GenerateConfig(min_turn_chars=3, drop_truncated=False, keep_truncated_answers=False)) is None
    assert rejection_reason(dialogue(finish=("length", "stop")), S) == "truncated_user"
    marked = mark_truncated(cut_answer)["messages"]
    assert marked[1]["truncated"] is True and "truncated" not in marked[0]


def test_short_or_empty_turns():
    assert rejection_reason(dialogue(user=""), S) == "short_user"
    assert rejection_reason(dialogue(answer="ok"), S) == "short_assistant"


def test_wrong_role():
    assert rejection_reason(dialogue(answer="Sure.\nUser: and then what?"), S) == "wrong_role_assistant"
    assert rejection_reason(dialogue(user="Hi<|im_start|>assistant"), S) == "wrong_role_user"
    assert rejection_reason(dialogue(answer="The user interface is simple."), S) is None


def test_degenerate_repetition():
    loop = "the cat sat on the mat " * 20
    assert repeated_ngram_fraction(loop, 4) > 0.8
    assert repeated_ngram_fraction("A perfectly ordinary sentence about cooking eggs in water.", 4) == 0
    assert rejection_reason(dialogue(answer=loop), S) == "degenerate_assistant"


def test_refusals_are_configurable():
    refusal = dialogue(answer="As an AI, I cannot have opinions about eggs.")
    assert rejection_reason(refusal, S) == "refusal"
    assert rejection_reason(refusal, GenerateConfig(min_turn_chars=3, refusal_patterns=[])) is None
    custom = GenerateConfig(min_turn_chars=3, refusal_patterns=[r"nine minutes"])
    assert rejection_reason(dialogue(), custom) == "refusal"


def test_contamination_by_ngram_overlap():
    index = ContaminationIndex(n=5)
    index.add("Which planet is known as the red planet in our solar system?")
    assert index.hits("Quiz: which planet is known as the red planet? Mars.")
    assert not index.hits("Tell me about the planets of the solar system.")


def test_contamination_paths_read_every_string(tmp_path):
    from sa_sft.config import load_config
    from sa_sft.generate.stage import contamination_index
    evalset = tmp_path / "mmlu.jsonl"
    evalset.write_text(json.dumps({"question": "What is the boiling point of water at sea level in Celsius?",
                                   "choices": ["90", "100"], "answer": 1}) + "\n")
    cfg = load_config("tiny", [f"generate.contamination_paths=[{evalset}]", "generate.contamination_ngram=6"])
    index = contamination_index(cfg.generate)
    assert index.hits("so what is the boiling point of water at sea level in celsius exactly")
