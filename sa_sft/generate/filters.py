"""Filters over generated dialogues: pure functions returning a rejection reason or None."""


def rejection_reason(dialogue: dict, min_turn_chars: int, drop_truncated: bool,
                     keep_truncated_answers: bool) -> str | None:
    last = len(dialogue["messages"]) - 1
    for i, (message, finish) in enumerate(zip(dialogue["messages"], dialogue["finish_reasons"])):
        role = message["role"]
        if len(message["content"].strip()) < max(1, min_turn_chars):
            return f"short_{role}"
        if finish == "length" and drop_truncated and not (keep_truncated_answers and i == last):
            return f"truncated_{role}"
    return None


def mark_truncated(dialogue: dict) -> dict:
    """Flag turns cut at the token cap so the trainer does not learn an end-of-turn there."""
    messages = [{**m, "truncated": True} if finish == "length" else m
                for m, finish in zip(dialogue["messages"], dialogue["finish_reasons"])]
    return {**dialogue, "messages": messages}
