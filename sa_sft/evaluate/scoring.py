"""Every likelihood the evaluation needs, from the engines that generate: vLLM's prompt log-probabilities
on the same Ray engine pool (tensor-parallel on GPUs), so a 70B model is scored on the GPUs that
generated and never loaded whole into one process.

  NLL         mean negative log-likelihood of a conversation's assistant tokens (the trainer's labels)
  MC (text)   the option whose text, as the assistant's answer, has the highest mean log-likelihood
  MC (letter) the option letter most likely as the first token of the answer
  KL          KL(base || final) per token, a Monte Carlo estimate on answers the base model samples
              from its own distribution (temperature 1, no top-p): with r = q(x)/p(x) for each
              sampled token x ~ p, the estimator k3 = (r - 1) - log r (unbiased, never negative,
              lower variance than log p - log q); its mean over tokens, with a bootstrap interval
              over answers.
Each builder returns the token sequences to score and, per sequence, the positions whose token's
log-probability is wanted; the reducers turn the engines' answers into the suite's result.
"""
import math
from dataclasses import dataclass

from sa_sft.chat import IGNORE_INDEX, assistant_prompt, render, tokenize_conversation
from sa_sft.evaluate.stats import accuracy, bootstrap_ratio_ci
from sa_sft.seeds import derive_seed

LETTERS = "ABCDEFGHIJ"


@dataclass
class Requests:
    sequences: list[list[int]]
    positions: list[list[int]]


def nll_requests(tokenizer, conversations: list[list[dict]], max_len: int) -> Requests:
    """Each conversation's tokens and the positions of its assistant tokens (those the trainer learns)."""
    sequences, positions = [], []
    for messages in conversations:
        t = tokenize_conversation(tokenizer, messages, max_len)
        sequences.append(t.input_ids)
        positions.append([i for i in range(1, len(t.labels)) if t.labels[i] != IGNORE_INDEX])
    return Requests(sequences, positions)


def nll_result(logprobs: list[list[float]]) -> dict:
    """Sum and mean NLL over every scored token, per-sample means, a bootstrap interval over samples."""
    sums = [-sum(lp) for lp in logprobs]
    counts = [len(lp) for lp in logprobs]
    total, tokens = sum(sums), sum(counts)
    mean = total / max(tokens, 1)
    return {"mean_nll": round(mean, 5), "ci95": bootstrap_ratio_ci(sums, counts),
            "perplexity": round(math.exp(min(mean, 50)), 3), "tokens": tokens, "samples": len(logprobs),
            "per_sample_mean_nll": [round(s / max(n, 1), 5) for s, n in zip(sums, counts)],
            "per_sample_tokens": counts}


def chance(rows: list[dict]) -> float:
    return sum(1 / len(r["choices"]) for r in rows) / len(rows)


def mc_text_requests(tokenizer, rows: list[dict], max_len: int) -> Requests:
    """One sequence per (question, option): the option's text as the assistant's answer."""
    conversations = [[{"role": "user", "content": row["question"]}, {"role": "assistant", "content": choice}]
                     for row in rows for choice in row["choices"]]
    return nll_requests(tokenizer, conversations, max_len)


def mc_text_result(rows: list[dict], logprobs: list[list[float]]) -> dict:
    correct, k = [], 0
    for row in rows:
        means = [sum(lp) / max(len(lp), 1) for lp in logprobs[k:k + len(row["choices"])]]
        k += len(row["choices"])
        correct.append(max(range(len(means)), key=means.__getitem__) == row["answer"])
    return accuracy(correct, chance=chance(rows))


def mc_prompt(tokenizer, row: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    question = f"{row['question']}\n{options}\nAnswer with the letter of the correct option."
    return render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def mc_letter_requests(tokenizer, rows: list[dict], max_len: int) -> Requests:
    """One sequence per (question, letter): the prompt, then the letter as the answer's first token."""
    sequences, positions = [], []
    for row in rows:
        prompt = tokenizer(mc_prompt(tokenizer, row), add_special_tokens=False)["input_ids"][-(max_len - 1):]
        for i in range(len(row["choices"])):
            letter = tokenizer(LETTERS[i], add_special_tokens=False)["input_ids"][0]
            sequences.append(prompt + [letter])
            positions.append([len(prompt)])
    return Requests(sequences, positions)


def mc_letter_result(rows: list[dict], logprobs: list[list[float]]) -> dict:
    correct, k = [], 0
    for row in rows:
        scores = [lp[0] for lp in logprobs[k:k + len(row["choices"])]]
        k += len(row["choices"])
        correct.append(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return accuracy(correct, chance=chance(rows))


def kl_prompts(tokenizer, conversations: list[list[dict]], max_len: int, answer_tokens: int,
               seed: int) -> tuple[list[list[int]], list[int]]:
    """The contexts the base model answers for the KL estimate (each held-out dialogue up to its last
    answer) and a sampling seed for each, a pure function of the run seed."""
    prompts = []
    for messages in conversations:
        ids = tokenizer(assistant_prompt(tokenizer, messages[:-1]), add_special_tokens=False)["input_ids"]
        prompts.append(ids[-max(1, max_len - answer_tokens):])
    return prompts, [derive_seed(seed, "evaluate", "kl", i) for i in range(len(prompts))]


def chat_prompts(tokenizer, prompts: list[str], max_len: int, answer_tokens: int,
                 seed: int) -> tuple[list[list[int]], list[int]]:
    """Single user prompts as contexts for the base model's answers, with a sampling seed each."""
    contexts = []
    for prompt in prompts:
        ids = tokenizer(assistant_prompt(tokenizer, [{"role": "user", "content": prompt}]),
                        add_special_tokens=False)["input_ids"]
        contexts.append(ids[-max(1, max_len - answer_tokens):])
    return contexts, [derive_seed(seed, "evaluate", "chat", i) for i in range(len(contexts))]


def kl_requests(prompts: list[list[int]], answers: list[list[int]]) -> Requests:
    """The base model's sampled answers after their contexts, to be scored by the fine-tuned model."""
    return Requests([p + a for p, a in zip(prompts, answers)],
                    [list(range(len(p), len(p) + len(a))) for p, a in zip(prompts, answers)])


def kl_result(base_logprobs: list[list[float]], final_logprobs: list[list[float]]) -> dict:
    sums, counts, k1 = [], [], 0.0
    for lp, lq in zip(base_logprobs, final_logprobs):
        per_token = [math.expm1(q - p) - (q - p) for p, q in zip(lp, lq)]  # (r - 1) - log r, r = q/p
        sums.append(sum(per_token))
        counts.append(len(per_token))
        k1 += sum(p - q for p, q in zip(lp, lq))
    tokens = sum(counts)
    return {"mean_kl": round(sum(sums) / max(tokens, 1), 6), "ci95": bootstrap_ratio_ci(sums, counts),
            "estimator": "k3 = (r - 1) - log r, r = q/p, on answers sampled from the base model (T=1)",
            "mean_log_ratio": round(k1 / max(tokens, 1), 6), "tokens": tokens, "samples": len(counts)}
