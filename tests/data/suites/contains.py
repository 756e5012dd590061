"""A user-written scorer for a gen: suite: called as contains(completion, answer) -> bool."""


def contains(completion: str, answer: str) -> bool:
    return answer.lower() in completion.lower()
