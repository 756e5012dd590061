"""Filters over generated dialogues. Per-dialogue checks are pure functions returning a
rejection reason or None; the contamination check keeps state across shards (duplicates:
sa_sft/generate/dedup.py)."""
import functools
import re
import unicodedata
from dataclasses import dataclass, field

from sa_sft.config import GenerateConfig

# Role headers a model leaks when it writes the other side's turn ("User: ...", "<|im_start|>assistant").
WRONG_ROLE = re.compile(r"<\|im_(start|end)\|>|(^|\n)\s*(user|assistant|human|ai|system)\s*:", re.IGNORECASE)
# Word n-grams a turn may repeat before it counts as a loop (with generate.max_repeated_ngram_fraction).
REPEATED_NGRAM_SIZE = 4


@functools.lru_cache(maxsize=8)
def compiled_refusals(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text)).strip()


def words(text: str) -> list[str]:
    return normalize(text).split()


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one: near 0 for prose, high for loops."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def rejection_reason(dialogue: dict, gcfg: GenerateConfig) -> str | None:
    """Why one dialogue is unusable on its own, or None."""
    last = len(dialogue["messages"]) - 1
    refusals = compiled_refusals(tuple(gcfg.refusal_patterns))
    for i, (message, finish) in enumerate(zip(dialogue["messages"], dialogue["finish_reasons"])):
        role, text = message["role"], message["content"]
        if len(text.strip()) < max(1, gcfg.min_turn_chars):
            return f"short_{role}"
        if finish == "length" and gcfg.drop_truncated and not (gcfg.keep_truncated_answers and i == last):
            return f"truncated_{role}"
        if gcfg.filter_wrong_role and WRONG_ROLE.search(text):
            return f"wrong_role_{role}"
        if repeated_ngram_fraction(text, REPEATED_NGRAM_SIZE) > gcfg.max_repeated_ngram_fraction:
            return f"degenerate_{role}"
        if role == "assistant" and any(p.search(text) for p in refusals):
            return "refusal"
    return None


def mark_truncated(dialogue: dict) -> dict:
    """Flag turns cut at the token cap so the trainer does not learn an end-of-turn there."""
    messages = [{**m, "truncated": True} if finish == "length" else m
                for m, finish in zip(dialogue["messages"], dialogue["finish_reasons"])]
    return {**dialogue, "messages": messages}


@dataclass
class ContaminationIndex:
    """Word n-grams of evaluation texts; a dialogue sharing any of them is contaminated."""
    n: int = 8
    grams: set = field(default_factory=set)

    def add(self, text: str) -> None:
        tokens = words(text)
        self.grams.update(" ".join(tokens[i:i + self.n]) for i in range(len(tokens) - self.n + 1))

    def hits(self, text: str) -> bool:
        tokens = words(text)
        return any(" ".join(tokens[i:i + self.n]) in self.grams for i in range(len(tokens) - self.n + 1))
