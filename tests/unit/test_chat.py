import pytest

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


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Conversations with the awkward contents: whitespace at the ends, template markers, emoji,
    U+2028, empty user turns, answers cut at the token cap, system turns, up to three exchanges."""
    import random
    rng = random.Random(seed)
    pieces = ["hello", "world", " ", "\n", "<|im_end|>", "#### 12", "ü", "  ", "x" * 50, "2 + 2 = 4.", "\t",
              "<|im_start|>user\n", "😀", "\u2028"]
    content = lambda: "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))  # noqa: E731
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": content()}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": content()})
            answer = {"role": "assistant", "content": content() or "a"}
            if rng.random() < 0.3:
                answer["truncated"] = True
            messages.append(answer)
        out.append(messages)
    return out


@pytest.mark.parametrize("max_len, train_on_prompt", [(4096, False), (20, False), (4096, True)])
def test_the_batched_tokenizer_gives_tokenize_conversation_exactly(tokenizer, max_len, train_on_prompt):
    from sa_sft.chat import ConversationTokenizer
    conversations = random_conversations(300) + [CONVERSATION]
    batched = ConversationTokenizer(tokenizer, max_len, train_on_prompt)
    for messages, got in zip(conversations, batched(conversations)):
        assert got == tokenize_conversation(tokenizer, messages, max_len, train_on_prompt)
    # Rendered once each: only contents ending in whitespace at a span's end take the exact path.
    assert batched.exact_path < len(conversations) / 3


def test_a_template_that_edits_contents_takes_the_exact_path(tokenizer):
    """A template that trims contents (Llama-3 style) cannot be cut into glue and contents: the
    conversations whose contents it changes are rendered the old way, with the same result."""
    import copy

    from sa_sft.chat import ConversationTokenizer
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim "
                              "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                              "{% endif %}")
    conversations = random_conversations(100, seed=1)
    batched = ConversationTokenizer(trimming, 4096)
    for messages, got in zip(conversations, batched(conversations)):
        assert got == tokenize_conversation(trimming, messages, 4096)
    assert 0 < batched.exact_path < len(conversations)


def test_the_vectorized_loss_mask_is_the_walk():
    import numpy as np

    from sa_sft.chat import loss_mask
    spans = [(3, 7), (10, 12), (20, 30)]
    walk = lambda starts: [any(a <= s < b for a, b in spans) for s in starts]  # noqa: E731
    for starts in ([0, 3, 4, 6, 7, 9, 10, 11, 12, 25, 30, 31], [5, 5, 5, 20, 29, 29], []):
        assert loss_mask(np.array(starts, dtype=np.int64), spans).tolist() == walk(starts)
    assert loss_mask(np.array([4, 2, 11]), spans).tolist() == [True, False, True]  # out of order: walked
    assert loss_mask(np.array([4, 5]), []).tolist() == [False, False]
