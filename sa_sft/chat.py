"""The one place that renders conversations: prompts for the generator, tokens and loss masks
for the trainer and the evaluator. What the generator wrote is exactly what the trainer sees.

Masks come from character spans: the text of each assistant turn (its content and the
template's end-of-turn marker) is located by rendering the conversation prefix with and
without the generation prompt, and a token carries loss iff it starts inside such a span.
"""
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
_SENTINEL = "\x00SA_SFT_SENTINEL\x00"


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_turn_prefix(tokenizer, history: list[dict]) -> str:
    """The text that precedes a user message's content (Magpie-style pre-query prompt).

    Found by rendering a user turn with a sentinel content and cutting at the sentinel, so it
    carries the template's default system turn and works for any chat template.
    """
    text = render(tokenizer, history + [{"role": "user", "content": _SENTINEL}])
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise ValueError("the chat template does not echo message content; cannot build a user-turn prompt")
    return text[:cut]


def assistant_prompt(tokenizer, messages: list[dict]) -> str:
    return render(tokenizer, messages, add_generation_prompt=True)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn.

    A turn marked `"truncated": true` (generation hit its token cap) spans its content only.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(assistant_prompt(tokenizer, messages[:i]))
        end = len(render(tokenizer, messages[: i + 1]).rstrip())
        if not text.startswith(render(tokenizer, messages[: i + 1])) or start > end:
            raise ValueError("the chat template is not prefix-stable (a turn renders differently "
                             "depending on what follows); cannot compute assistant masks")
        if message.get("truncated") and text.startswith(message["content"], start):
            # Cut at the token cap: learn its text, not an end-of-turn the model never wrote.
            end = start + len(message["content"])
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int,
                          train_on_prompt: bool = False) -> Tokenized:
    """Token ids and labels; labels are IGNORE_INDEX outside assistant turns (unless train_on_prompt)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    span_idx = 0
    for token_id, (start, _end) in zip(ids, enc["offset_mapping"]):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        inside = span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]
        labels.append(token_id if (inside or train_on_prompt) else IGNORE_INDEX)
    truncated = len(ids) > max_len
    return Tokenized(ids[:max_len], labels[:max_len], truncated)


def validate_messages(messages) -> str | None:
    """Why a conversation cannot be trained on, or None when it is fine."""
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with `role` and `content`"
        if m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string"
        if m["role"] == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"message {i} is an empty assistant turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's"
    return None


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
