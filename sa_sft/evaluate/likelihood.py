"""Scoring by likelihood: mean token NLL of assistant turns, KL between two models, and multiple
choice (the most likely option text, or option letter)."""
import math

import torch

from sa_sft.chat import IGNORE_INDEX, pad_token_id, render, tokenize_conversation
from sa_sft.data.packing import collate
from sa_sft.evaluate.stats import accuracy, bootstrap_ratio_ci

LETTERS = "ABCDEFGHIJ"


def load_model(path, dtype: torch.dtype, trust_remote_code: bool = False, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    return tokenizer, model.to(device).eval()


def plain_head(model) -> bool:
    """The logits are just the output embedding applied to the last hidden state (no soft-capping or scaling)."""
    config = model.config
    return (model.get_output_embeddings() is not None and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", 1.0) in (None, 1.0))


def scored_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, row) for every position that predicts a scored label token.

    The output projection over the vocabulary is applied only to those positions: for short
    answers after long prompts (multiple choice) most of a batch is prompt, and projecting it
    would be most of the work and memory."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in (input_ids, attention_mask, labels))
    targets = labels[:, 1:]
    row, col = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    if plain_head(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[row, col])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[row, col]
    return logits.float(), targets[row, col], row


@torch.no_grad()
def token_nll(model, tokenizer, conversations: list[list[dict]], max_len: int, batch_size: int) -> dict:
    """Sum and mean NLL over assistant tokens, batched by length to keep padding low."""
    rows = [tokenize_conversation(tokenizer, messages, max_len) for messages in conversations]
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    pad_id = pad_token_id(tokenizer)
    per_sample = [0.0] * len(rows)
    per_sample_tokens = [0] * len(rows)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([rows[i] for i in idx], pad_id, packed=False)
        logits, targets, row = scored_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu()
        row = row.cpu()
        sums = torch.zeros(len(idx)).index_add_(0, row, nll)
        counts = torch.bincount(row, minlength=len(idx))
        for j, i in enumerate(idx):
            n = int(counts[j])
            per_sample[i] = float(sums[j]) / max(n, 1)
            per_sample_tokens[i] = n
            total_nll += float(sums[j])
            total_tokens += n
    mean = total_nll / max(total_tokens, 1)
    ci = bootstrap_ratio_ci([m * n for m, n in zip(per_sample, per_sample_tokens)], per_sample_tokens)
    return {"mean_nll": round(mean, 5), "ci95": ci, "perplexity": round(math.exp(min(mean, 50)), 3),
            "tokens": total_tokens, "samples": len(rows),
            "per_sample_mean_nll": [round(x, 5) for x in per_sample], "per_sample_tokens": per_sample_tokens}


@torch.no_grad()
def kl_from_base(base, final, tokenizer, conversations: list[list[dict]], max_len: int, batch_size: int) -> dict:
    """Mean per-token KL(base || final) over assistant tokens: how far the fine-tuned model's
    next-token distribution moved from the base model's on the base model's own answers."""
    rows = [tokenize_conversation(tokenizer, messages, max_len) for messages in conversations]
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    pad_id = pad_token_id(tokenizer)
    sums, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id, packed=False)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        base_logits, _, row = scored_logits(base, *inputs)
        log_p = torch.log_softmax(base_logits, dim=-1)
        log_q = torch.log_softmax(scored_logits(final, *inputs)[0], dim=-1)
        kl, row = (log_p.exp() * (log_p - log_q)).sum(-1).cpu(), row.cpu()
        n = batch["input_ids"].shape[0]
        sums.extend(torch.zeros(n).index_add_(0, row, kl).tolist())
        counts.extend(torch.bincount(row, minlength=n).tolist())
    mean = sum(sums) / max(sum(counts), 1)
    return {"mean_kl": round(mean, 6), "ci95": bootstrap_ratio_ci(sums, counts), "tokens": sum(counts),
            "samples": len(rows)}


def mc_prompt(tokenizer, row: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    question = f"{row['question']}\n{options}\nAnswer with the letter of the correct option."
    return render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


@torch.no_grad()
def score_mc(model, tokenizer, rows: list[dict], batch_size: int) -> dict:
    """Accuracy: the option letter the model finds most likely as its answer's first token."""
    letter_ids = [tokenizer(LETTERS[i], add_special_tokens=False)["input_ids"][0] for i in range(len(LETTERS))]
    correct = []
    pad_id = pad_token_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        encoded = [tokenizer(mc_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in batch]
        width = max(map(len, encoded))
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, e in enumerate(encoded):  # left padding: the next-token logits sit in the last column
            ids[j, width - len(e):] = torch.tensor(e)
            mask[j, width - len(e):] = 1
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, position_ids = ids.to(model.device), mask.to(model.device), position_ids.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float().cpu()
        for j, row in enumerate(batch):
            options = logits[j, letter_ids[:len(row["choices"])]]
            correct.append(int(options.argmax()) == row["answer"])
    return accuracy(correct, chance=sum(1 / len(r["choices"]) for r in rows) / len(rows))


@torch.no_grad()
def score_mc_text(model, tokenizer, rows: list[dict], batch_size: int) -> dict:
    """Accuracy: the option whose text, as the assistant's answer, has the highest mean token
    log-likelihood (cloze scoring; small models often pick letters near chance but texts well)."""
    pairs = [(i, c) for i, row in enumerate(rows) for c in range(len(row["choices"]))]
    conversations = [[{"role": "user", "content": rows[i]["question"]},
                      {"role": "assistant", "content": rows[i]["choices"][c]}] for i, c in pairs]
    means = [-nll for nll in token_nll(model, tokenizer, conversations, 1024, batch_size)["per_sample_mean_nll"]]
    best: dict[int, tuple[float, int]] = {}
    for (i, c), m in zip(pairs, means):
        if i not in best or m > best[i][0]:
            best[i] = (m, c)
    correct = [best[i][1] == row["answer"] for i, row in enumerate(rows)]
    return accuracy(correct, chance=sum(1 / len(r["choices"]) for r in rows) / len(rows))
