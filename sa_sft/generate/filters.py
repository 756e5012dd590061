"""Filters over generated dialogues: pure functions returning a rejection reason or None."""


def rejection_reason(dialogue: dict, min_turn_chars: int, drop_truncated: bool) -> str | None:
    for message, finish in zip(dialogue["messages"], dialogue["finish_reasons"]):
        role = message["role"]
        if drop_truncated and finish == "length":
            return f"truncated_{role}"
        if len(message["content"].strip()) < max(1, min_turn_chars):
            return f"short_{role}"
    return None
