"""Self-data strategies: pure logic from (seed, shard, what was written so far) to the next request.

A strategy turns one dialogue's state into the next generation request, folds each
completion back into the state, and says when the dialogue is done. The engine actor only
runs the requests; every prompt and seed is a pure function of (run seed, shard, index,
step), so a shard's content does not depend on which engine ran it.

- `self_dialogue` (default, Magpie-style): the user turn is written from the bare
  pre-query part of the model's own chat template (default system turn + user header),
  then answered as the assistant; alternating for `turns` messages.
- `topic_prompted`: the model is asked in an ordinary chat message to name a topic, then
  to write one question a user might ask about it; then it answers that question.
- `rewrite` (SDFT-style self-distillation): for each task row the model rewrites the
  reference answer in its own words; a rewrite that fails the check keeps the original.
"""
import re
from dataclasses import dataclass, field

from sa_sft.chat import assistant_prompt, user_turn_prefix
from sa_sft.engines.actor import Request
from sa_sft.seeds import derive_seed

TOPIC_PROMPT = "Name one topic that people often ask an AI assistant about. Reply with the topic only, in a few words."
QUESTION_PROMPT = ("Write one question that a user might ask an AI assistant about {topic}. "
                   "Reply with the question only.")
REWRITE_PROMPT = ("Here is a question and a reference answer.\n\nQuestion:\n{question}\n\nReference answer:\n{reference}\n\n"
                  "Rewrite the reference answer in your own words. Keep every step and the final answer exactly, "
                  "including its last line. Reply with the rewritten answer only.")


@dataclass(frozen=True)
class Turn:
    """One generation request: what it writes, the text to continue, its seed and token cap."""
    kind: str
    prompt: str
    seed: int
    max_tokens: int


def dialogue_id(shard: int, index: int) -> str:
    return f"self-{shard:05d}-{index:04d}"


def new_state(shard: int, index: int, task_row: dict | None = None) -> dict:
    state = {"id": dialogue_id(shard, index), "shard": shard, "index": index, "messages": [],
             "finish_reasons": [], "tokens": [], "seeds": [], "meta": {}}
    if task_row is not None:
        state.update(id=f"rewrite-{task_row['id']}", task_id=task_row["id"], task=task_row)
    return state


def next_turn(strategy: str, tokenizer, run_seed: int, state: dict, s: dict) -> Turn | None:
    """The next request for this dialogue, or None when it is complete. `s` holds the sampling settings."""
    step = len(state["seeds"])
    seed = derive_seed(run_seed, "generate", state["shard"], state["index"], step)
    messages = state["messages"]
    if strategy == "rewrite":
        if step:
            return None
        task = state["task"]["messages"]
        question = "\n\n".join(m["content"] for m in task[:-1] if m["role"] == "user")
        prompt = REWRITE_PROMPT.format(question=question, reference=task[-1]["content"])
        return Turn("rewrite", assistant_prompt(tokenizer, [{"role": "user", "content": prompt}]), seed,
                    s["max_assistant_tokens"])
    if len(messages) >= s["turns"]:
        return None
    if strategy == "topic_prompted" and not messages:
        if "topic" not in state["meta"]:
            return Turn("topic", assistant_prompt(tokenizer, [{"role": "user", "content": TOPIC_PROMPT}]), seed, 16)
        ask = QUESTION_PROMPT.format(topic=state["meta"]["topic"])
        return Turn("user", assistant_prompt(tokenizer, [{"role": "user", "content": ask}]), seed, s["max_user_tokens"])
    if len(messages) % 2 == 0:
        return Turn("user", user_turn_prefix(tokenizer, messages), seed, s["max_user_tokens"])
    return Turn("assistant", assistant_prompt(tokenizer, messages), seed, s["max_assistant_tokens"])


def apply_completion(state: dict, turn: Turn, text: str, finish_reason: str, num_tokens: int) -> None:
    state["seeds"].append(turn.seed)
    text = text.strip()
    if turn.kind == "topic":
        state["meta"]["topic"] = text.splitlines()[0].strip(" .\"'") if text else "anything"
        return
    if turn.kind == "rewrite":
        state["meta"]["rewrite"] = {"text": text, "finish_reason": finish_reason, "tokens": num_tokens}
        return
    state["messages"].append({"role": turn.kind, "content": text})
    state["finish_reasons"].append(finish_reason)
    state["tokens"].append(num_tokens)


def final_answer(text: str) -> str | None:
    """The last line's answer marker (`#### 42`) if the text has one."""
    match = re.search(r"####\s*(.+?)\s*$", text.strip())
    return match.group(1) if match else None


def rewrite_check(reference: str, rewrite: dict, answer: str | None) -> str | None:
    """Why a rewrite must not replace the reference, or None when it may."""
    text = rewrite["text"]
    if rewrite["finish_reason"] == "length":
        return "truncated"
    if not text:
        return "empty"
    expected = final_answer(reference) or answer
    if expected is not None and final_answer(text) != str(expected).strip() and str(expected).strip() not in text[-80:]:
        return "answer_changed"
    if not 0.3 <= len(text) / max(1, len(reference)) <= 3.0:
        return "length"
    return None


def finish_state(state: dict) -> dict:
    """The record written to the shard file."""
    if "task" in state:
        task = state["task"]
        reason = rewrite_check(task["messages"][-1]["content"], state["meta"]["rewrite"], task.get("answer"))
        content = task["messages"][-1]["content"] if reason else state["meta"]["rewrite"]["text"]
        return {"id": state["id"], "task_id": state["task_id"], "shard": state["shard"],
                "messages": task["messages"][:-1] + [{"role": "assistant", "content": content}],
                "finish_reasons": [None] * (len(task["messages"]) - 1) + ["stop"],
                "kept_original": reason, "seeds": state["seeds"], "meta": state["meta"]}
    return {k: state[k] for k in ("id", "shard", "messages", "finish_reasons", "tokens", "seeds", "meta")}


@dataclass
class ShardProgram:
    """One shard's dialogues (or rewrites) as a program an engine runs (`EngineActor.run_program`):
    every item in flight at once, each item's next request made by its strategy from what it
    wrote so far. `sampling` holds the strategy, temperature, top_p, top_k, turns and token caps."""
    run_seed: int
    shard: int
    size: int
    sampling: dict
    task_rows: list[dict] | None = None
    strategy: str = field(init=False)

    def __post_init__(self):
        self.strategy = self.sampling["strategy"]

    @property
    def priority(self) -> int:
        """Earlier shards first when an engine streams several (lower runs first)."""
        return self.shard

    def start(self) -> list[dict]:
        if self.task_rows is not None:
            return [new_state(self.shard, i, row) for i, row in enumerate(self.task_rows)]
        return [new_state(self.shard, i) for i in range(self.size)]

    def next_request(self, tokenizer, state: dict) -> Request | None:
        turn = next_turn(self.strategy, tokenizer, self.run_seed, state, self.sampling)
        if turn is None:
            return None
        s = self.sampling
        return Request(id=f"{state['id']}-{len(state['seeds'])}", prompt=turn.prompt, max_tokens=turn.max_tokens,
                       seed=turn.seed, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                       kind=turn.kind)

    def on_completion(self, state: dict, request: Request, text: str, finish_reason: str, num_tokens: int) -> None:
        turn = Turn(request.kind, request.prompt, request.seed, request.max_tokens)
        apply_completion(state, turn, text, finish_reason, num_tokens)

    def result(self, states: list[dict]) -> dict:
        return {"shard": self.shard, "dialogues": [finish_state(s) for s in states]}
