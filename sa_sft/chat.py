"""The one place that renders conversations: prompts for the generator, tokens and loss masks
for the trainer and the evaluator. What the generator wrote is exactly what the trainer sees.

Masks come from character spans: the text of each assistant turn (its content and the
template's end-of-turn marker) is located by rendering the conversation prefix with and
without the generation prompt, and a token carries loss iff it starts inside such a span.
"""
from dataclasses import dataclass

import numpy as np

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


def loss_mask(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Whether each token (by the character it starts at) lies in an assistant span: the walk of
    tokenize_conversation, vectorized (token starts never decrease; checked)."""
    if not spans or len(starts) == 0:
        return np.zeros(len(starts), dtype=bool)
    if (np.diff(starts) < 0).any():  # never seen from a real tokenizer; then the walk itself
        inside, span_idx = np.zeros(len(starts), dtype=bool), 0
        for t, start in enumerate(starts.tolist()):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                span_idx += 1
            inside[t] = span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]
        return inside
    span_starts, span_ends = np.array(spans, dtype=np.int64).T
    # The first span ending after the token's start: the token is inside iff that span began at or before it.
    k = np.searchsorted(span_ends, starts, side="right")
    inside = k < len(spans)
    inside[inside] = span_starts[k[inside]] <= starts[inside]
    return inside


class ConversationTokenizer:
    """`tokenize_conversation` for many conversations, rendering each one once instead of 1 + 3 x its
    assistant turns times, and encoding them in batches. Gives exactly tokenize_conversation's output.

    For each sequence of roles, the conversation is rendered once with sentinel contents: the template's
    text between the contents (the glue) and where the assistant spans start and end relative to the
    contents are read from it with `assistant_spans` itself. A real conversation is then rendered once;
    if the render is exactly the glue with its contents in place (the template treats content as opaque
    text), its spans follow by offset arithmetic. Otherwise (a template that trims, escapes or branches
    on content) that conversation takes the exact path, `assistant_spans`.
    """

    def __init__(self, tokenizer, max_len: int, train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train_on_prompt = train_on_prompt
        self._layouts: dict[tuple, tuple | None] = {}
        self.exact_path = 0  # conversations that took assistant_spans (tests, benchmarks)

    def __call__(self, conversations: list[list[dict]]) -> list[Tokenized]:
        return [Tokenized(ids.tolist(), labels.tolist(), truncated) for ids, labels, truncated in self.arrays(conversations)]

    def arrays(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """(input ids, labels, truncated) per conversation, as numpy arrays (int64)."""
        rendered = [self.spans(messages) for messages in conversations]
        out = []
        for (_, spans), (ids, starts) in zip(rendered, self._encode([text for text, _ in rendered])):
            labels = ids.copy() if self.train_on_prompt else np.where(loss_mask(starts, spans), ids, IGNORE_INDEX)
            out.append((ids[:self.max_len], labels[:self.max_len], len(ids) > self.max_len))
        return out

    def _encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, the character each starts at) per text, as tokenizer(text, add_special_tokens=False,
        return_offsets_mapping=True) gives them. A fast tokenizer's Rust backend is called directly
        (transformers' conversion of each encoding to Python lists cost as much as the encoding) when
        it neither truncates nor pads, which is what the call above sets it to."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            pairs = zip(enc["input_ids"], enc["offset_mapping"])
        # The starts by a list comprehension: numpy's conversion of a list of pairs costs 5x more.
        return [(np.array(ids, dtype=np.int64), np.array([start for start, _ in offsets], dtype=np.int64))
                for ids, offsets in pairs]

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """What assistant_spans(tokenizer, messages) returns, from one render when the layout allows."""
        found = self._spans_from_layout(messages)
        if found is None:
            self.exact_path += 1
            return assistant_spans(self.tokenizer, messages)
        return found

    def _spans_from_layout(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
        roles = tuple(m["role"] for m in messages)
        if roles not in self._layouts:
            self._layouts[roles] = self._layout(roles)
        layout = self._layouts[roles]
        if layout is None:
            return None
        glue, anchors = layout
        text = render(self.tokenizer, messages)
        # The render must be exactly the glue with the contents in place; then each content's bounds are known.
        pieces, bounds, pos = [glue[0]], [], len(glue[0])
        for message, after in zip(messages, glue[1:]):
            content = message["content"]
            bounds.append((pos, pos + len(content)))
            pos += len(content) + len(after)
            pieces += (content, after)
        if text != "".join(pieces):
            return None
        spans = []
        for i, (start_anchor, end_anchor) in anchors:
            j, side, delta = end_anchor
            if side == 1 and delta == 0 and not messages[j]["content"][-1:].strip():
                # The span ends where a content ends: assistant_spans' rstrip would reach into it.
                return None
            start, end = self._place(start_anchor, bounds), self._place(end_anchor, bounds)
            if messages[i].get("truncated") and text.startswith(messages[i]["content"], start):
                end = start + len(messages[i]["content"])  # as assistant_spans: its text, no end-of-turn
            spans.append((start, end))
        return text, spans

    @staticmethod
    def _place(anchor: tuple[int, int, int], bounds: list[tuple[int, int]]) -> int:
        j, side, delta = anchor
        return delta if j < 0 else bounds[j][side] + delta

    def _layout(self, roles: tuple) -> tuple | None:
        """(glue pieces, per assistant turn its span's start and end as (content j, start 0 / end 1, offset)),
        or None when the sentinel render cannot be cut into glue and contents."""
        sentinels = [f"\x00SA_SFT_{i}\x00" for i in range(len(roles))]
        messages = [{"role": role, "content": s} for role, s in zip(roles, sentinels)]
        try:
            text, spans = assistant_spans(self.tokenizer, messages)
        except Exception:  # noqa: BLE001 - the exact path raises its own error for the real conversation
            return None
        glue, bounds, pos = [], [], 0
        for s in sentinels:
            at = text.find(s, pos)
            if at < 0 or text.count(s) != 1:
                return None
            glue.append(text[pos:at])
            bounds.append((at, at + len(s)))
            pos = at + len(s)
        glue.append(text[pos:])

        def anchor(p: int) -> tuple[int, int, int] | None:
            """p as (content j, side, offset) from the last content boundary at or before it."""
            best = (-1, 0, p)
            for j, (start, end) in enumerate(bounds):
                if start < p < end:
                    return None  # inside a content: not expressible
                if start <= p:
                    best = (j, 0, p - start)
                if end <= p:
                    best = (j, 1, p - end)
            return best

        assistants = [i for i, role in enumerate(roles) if role == "assistant"]
        anchors = [(i, (anchor(start), anchor(end))) for i, (start, end) in zip(assistants, spans)]
        if any(a is None or b is None for _, (a, b) in anchors):
            return None
        return glue, anchors


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
