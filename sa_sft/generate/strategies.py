"""Self-dialogue strategies: pure functions from (seed, shard) to prompts, and outputs to dialogues.

`self_dialogue` (Magpie-style): the model writes the user's message from the bare
pre-query part of its own chat template (default system turn + the user header), then
answers it as the assistant. Nothing outside the model is used.
"""
import hashlib
from dataclasses import dataclass

from sa_sft.chat import assistant_prompt, user_turn_prefix


def derive_seed(*parts) -> int:
    """A 31-bit seed that is a pure function of its parts (run seed, stage, shard, item, turn)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Turn:
    """One generation request: the text to continue, its seed and its token cap."""
    prompt: str
    seed: int
    max_tokens: int


def dialogue_ids(shard: int, shard_size: int) -> list[str]:
    return [f"self-{shard:05d}-{i:04d}" for i in range(shard_size)]


def user_turns(tokenizer, run_seed: int, shard: int, shard_size: int, max_tokens: int) -> list[Turn]:
    prefix = user_turn_prefix(tokenizer, [])
    return [Turn(prefix, derive_seed(run_seed, "generate", shard, i, "user"), max_tokens)
            for i in range(shard_size)]


def assistant_turns(tokenizer, run_seed: int, shard: int, user_texts: list[str], max_tokens: int) -> list[Turn]:
    return [Turn(assistant_prompt(tokenizer, [{"role": "user", "content": text}]),
                 derive_seed(run_seed, "generate", shard, i, "assistant"), max_tokens)
            for i, text in enumerate(user_texts)]
