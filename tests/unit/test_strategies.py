"""Strategies are pure: the same (seed, shard, index, state) gives the same request."""
from sa_sft.generate import strategies as st

SAMPLING = {"turns": 2, "max_user_tokens": 32, "max_assistant_tokens": 64}


def run(strategy, tokenizer, outputs, task_row=None, sampling=SAMPLING):
    """Drive one dialogue with canned completions; return the requests made and the record."""
    state = st.new_state(3, 5, task_row)
    turns = []
    while (turn := st.next_turn(strategy, tokenizer, 1234, state, sampling)) is not None:
        turns.append(turn)
        st.apply_completion(state, turn, outputs[len(turns) - 1], "stop", 7)
    return turns, st.finish_state(state)


def test_self_dialogue_user_then_assistant(tokenizer):
    turns, record = run("self_dialogue", tokenizer, ["How do tides work?", "The Moon's gravity pulls the oceans."])
    assert [t.kind for t in turns] == ["user", "assistant"]
    assert turns[0].prompt.endswith("<|im_start|>user\n")
    assert turns[1].prompt.endswith("How do tides work?<|im_end|>\n<|im_start|>assistant\n")
    assert record["id"] == "self-00003-0005"
    assert record["messages"] == [{"role": "user", "content": "How do tides work?"},
                                  {"role": "assistant", "content": "The Moon's gravity pulls the oceans."}]
    assert record["seeds"] == [st.derive_seed(1234, "generate", 3, 5, 0), st.derive_seed(1234, "generate", 3, 5, 1)]
    # Pure: the same inputs give the same requests.
    assert run("self_dialogue", tokenizer, ["How do tides work?", "x"])[0][0] == turns[0]


def test_multi_turn_alternates(tokenizer):
    turns, record = run("self_dialogue", tokenizer, ["q1", "a1", "q2", "a2"], sampling={**SAMPLING, "turns": 4})
    assert [t.kind for t in turns] == ["user", "assistant", "user", "assistant"]
    assert "q1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\n" in turns[2].prompt
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]


def test_topic_prompted_asks_for_a_topic_then_a_question(tokenizer):
    turns, record = run("topic_prompted", tokenizer, ["Gardening.", "How often should I water tomatoes?", "Daily."])
    assert [t.kind for t in turns] == ["topic", "user", "assistant"]
    assert "Name one topic" in turns[0].prompt and "about Gardening" in turns[1].prompt
    assert record["meta"]["topic"] == "Gardening"
    assert record["messages"][0] == {"role": "user", "content": "How often should I water tomatoes?"}


def test_rewrite_keeps_the_original_when_the_check_fails(tokenizer):
    row = {"id": "task-7", "messages": [{"role": "user", "content": "What is 6*7?"},
                                        {"role": "assistant", "content": "6*7 = 42\n#### 42"}], "answer": "42"}
    turns, record = run("rewrite", tokenizer, ["Six times seven is 42.\n#### 42"], task_row=row)
    assert [t.kind for t in turns] == ["rewrite"] and "Reference answer:\n6*7 = 42" in turns[0].prompt
    assert record["messages"][-1]["content"] == "Six times seven is 42.\n#### 42" and record["kept_original"] is None
    _, bad = run("rewrite", tokenizer, ["Six times seven is 41.\n#### 41"], task_row=row)
    assert bad["messages"][-1]["content"] == "6*7 = 42\n#### 42" and bad["kept_original"] == "answer_changed"
    assert record["task_id"] == "task-7"
