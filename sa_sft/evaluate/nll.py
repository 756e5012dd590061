"""Mean token negative log-likelihood of assistant turns under a model."""
import math

import torch

from sa_sft.chat import IGNORE_INDEX, tokenize_conversation
from sa_sft.data.packing import collate
from sa_sft.evaluate.suites import bootstrap_ratio_ci


def load_model(path, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return tokenizer, model.eval()


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        mask = targets != IGNORE_INDEX
        for j, i in enumerate(idx):
            n = int(mask[j].sum())
            per_sample[i] = float(nll[j].sum()) / max(n, 1)
            per_sample_tokens[i] = n
            total_nll += float(nll[j].sum())
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
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        log_p = torch.log_softmax(base(**inputs).logits[:, :-1].float(), dim=-1)
        log_q = torch.log_softmax(final(**inputs).logits[:, :-1].float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        for j in range(kl.shape[0]):
            sums.append(float(kl[j][mask[j]].sum()))
            counts.append(int(mask[j].sum()))
    mean = sum(sums) / max(sum(counts), 1)
    return {"mean_kl": round(mean, 6), "ci95": bootstrap_ratio_ci(sums, counts), "tokens": sum(counts),
            "samples": len(rows)}
