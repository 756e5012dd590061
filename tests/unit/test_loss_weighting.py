"""Every loss token of an optimizer step weighs the same, whatever else landed in its micro-batch or rank:
the trainer's step gradient equals the gradient of the mean token loss over all its samples at once."""
import pytest
import torch

from sa_sft.chat import tokenize_conversation
from sa_sft.data.packing import collate
from sa_sft.train.recipe import loss_divisor

WORLD, ACCUM, MICRO = 2, 2, 2


def samples(tokenizer):
    short = [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
             for w in ("yes", "no", "maybe", "ok")]
    long = [[{"role": "user", "content": "Explain why the sky is blue."},
             {"role": "assistant", "content": "Sunlight scatters off air molecules; " * (3 + i)}] for i in range(4)]
    rows = [tokenize_conversation(tokenizer, m, 256) for m in short + long]
    return [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def step_gradient(model, tokenizer, rows, token_weighted: bool):
    """What DeepSpeed makes of the trainer's losses: each micro-batch's loss divided by grad_accum,
    the gradients averaged over the ranks. Rank r takes rows r, r+WORLD, ... as the mix splits them."""
    model.zero_grad()
    per_rank = [rows[r::WORLD] for r in range(WORLD)]
    batches = [[collate(rank_rows[i:i + MICRO], tokenizer.eos_token_id, packed=False)
                for i in range(0, len(rank_rows), MICRO)] for rank_rows in per_rank]
    total = sum(b["loss_tokens"] for rank in batches for b in rank)
    for rank in batches:
        for batch in rank:
            inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
            if token_weighted:
                loss = model(**inputs, num_items_in_batch=torch.tensor(loss_divisor(total, WORLD, ACCUM))).loss
            else:  # each micro-batch's own mean, as before
                loss = model(**inputs).loss
            (loss / (ACCUM * WORLD)).backward()
    return grads(model)


def test_the_step_gradient_is_the_mean_over_all_loss_tokens(tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows = samples(tokenizer)
    model.zero_grad()
    whole = collate(rows, tokenizer.eos_token_id, packed=False)
    model(**{k: whole[k] for k in ("input_ids", "labels", "attention_mask")}).loss.backward()
    reference = grads(model)
    ours = step_gradient(model, tokenizer, rows, token_weighted=True)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-7)
    # The mean of micro-batch means weighs a token of a short answer far more: a different gradient.
    old = step_gradient(model, tokenizer, rows, token_weighted=False)
    assert (old - reference).norm() > 0.05 * reference.norm()


def test_the_divisor():
    assert loss_divisor(400, world=2, grad_accum=4) == 50
    assert loss_divisor(0, world=1, grad_accum=1) == 1  # a step without loss tokens does not divide by zero
    with pytest.raises(TypeError):
        loss_divisor(10)
