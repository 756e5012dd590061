from sa_sft.chat import (IGNORE_INDEX, assistant_prompt, render, tokenize_conversation, user_turn_prefix,
                         validate_messages)

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "4 * 3 = 12.\n#### 12"},
]


def loss_runs(tokens):
    """Contiguous runs of loss-carrying token ids."""
    runs, current = [], []
    for token_id, label in zip(tokens.input_ids, tokens.labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_only_assistant_turns_carry_loss(tokenizer):
    tokens = tokenize_conversation(tokenizer, CONVERSATION, max_len=4096)
    decoded = [tokenizer.decode(run) for run in loss_runs(tokens)]
    assert decoded == ["2 + 2 = 4.<|im_end|>", "4 * 3 = 12.\n#### 12<|im_end|>"]
    # Everything else (system turn, user turns, role headers) carries none.
    masked = tokenizer.decode([t for t, l in zip(tokens.input_ids, tokens.labels) if l == IGNORE_INDEX])
    assert "What is 2 + 2?" in masked and "And times 3?" in masked and "SmolLM" in masked
    assert "= 4." not in masked
    # The tokens are exactly those of the rendered text.
    assert tokenizer.decode(tokens.input_ids) == render(tokenizer, CONVERSATION)


def test_train_on_prompt_and_truncation(tokenizer):
    full = tokenize_conversation(tokenizer, CONVERSATION, max_len=4096, train_on_prompt=True)
    assert full.labels == full.input_ids and not full.truncated
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_len=20)
    assert cut.truncated and len(cut.input_ids) == 20


def test_generation_prompts_match_the_training_render(tokenizer):
    prefix = user_turn_prefix(tokenizer, [])
    assert prefix.endswith("<|im_start|>user\n") and "system" in prefix
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    # What the generator prompts with is a prefix of what the trainer tokenizes.
    assert render(tokenizer, dialogue).startswith(prefix + "Hi")
    assert render(tokenizer, dialogue).startswith(assistant_prompt(tokenizer, dialogue[:1]) + "Hello!")


def test_validate_messages():
    assert validate_messages(CONVERSATION) is None
    assert "unknown role" in validate_messages([{"role": "bot", "content": "x"}])
    assert "empty assistant" in validate_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}])
    assert "last message" in validate_messages(CONVERSATION[:1] + CONVERSATION[1:2] + CONVERSATION[2:3])
    assert "non-empty list" in validate_messages([])


def test_truncated_answer_carries_no_end_of_turn(tokenizer):
    cut = [{"role": "user", "content": "Tell me a story."},
           {"role": "assistant", "content": "Once upon a time there", "truncated": True}]
    tokens = tokenize_conversation(tokenizer, cut, max_len=4096)
    assert [tokenizer.decode(run) for run in loss_runs(tokens)] == ["Once upon a time there"]
