"""Self-dialogue strategies: pure functions from (seed, shard, dialogue so far) to the next request.

`self_dialogue` (Magpie-style): the model writes the user's message from the bare
pre-query part of its own chat template (default system turn + the user header), then
answers it as the assistant, alternating for `turns` turns. Nothing outside the model is
used.
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
    """One generation request: whose turn it is, the text to continue, its seed and token cap."""
    role: str
    prompt: str
    seed: int
    max_tokens: int


def dialogue_id(shard: int, index: int) -> str:
    return f"self-{shard:05d}-{index:04d}"


def next_turn(tokenizer, run_seed: int, shard: int, index: int, messages: list[dict],
              max_user_tokens: int, max_assistant_tokens: int) -> Turn:
    """The request that writes turn len(messages) of dialogue `index` in `shard`."""
    turn = len(messages)
    seed = derive_seed(run_seed, "generate", shard, index, turn)
    if turn % 2 == 0:
        return Turn("user", user_turn_prefix(tokenizer, messages), seed, max_user_tokens)
    return Turn("assistant", assistant_prompt(tokenizer, messages), seed, max_assistant_tokens)
