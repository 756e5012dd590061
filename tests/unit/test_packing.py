"""Packed samples do not see each other: per-sample losses match the unpacked ones."""
import torch

from sa_sft.chat import IGNORE_INDEX, tokenize_conversation
from sa_sft.data.packing import block_causal_mask, collate, pack, packing_efficiency


def samples(tokenizer, n=6):
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}: what is {i} + {i * 3}?" + " Please explain." * (i % 3)},
                    {"role": "assistant", "content": f"{i} + {i * 3} = {i * 4}." + " Indeed." * i}]
        t = tokenize_conversation(tokenizer, messages, max_len=512)
        out.append({"id": f"s{i}", "source": "task", "input_ids": t.input_ids, "labels": t.labels})
    return out


def per_sample_losses(model, batch, rows):
    logits = model(**{k: v for k, v in batch.items() if k not in ("real_tokens", "num_samples", "labels")}).logits
    losses = []
    for b, row in enumerate(rows):
        offset = 0
        for n in row.get("seq_lens") or [len(row["input_ids"])]:
            lg = logits[b, offset:offset + n - 1]
            tg = batch["labels"][b, offset + 1:offset + n]
            losses.append(torch.nn.functional.cross_entropy(lg, tg, ignore_index=IGNORE_INDEX).item())
            offset += n
    return losses


def test_packed_losses_equal_unpacked(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = samples(tokenizer)
    packs = pack(rows, max_len=256)
    assert len(packs) < len(rows)  # something was actually packed together
    with torch.no_grad():
        packed = per_sample_losses(model, collate(packs, tokenizer.pad_token_id, packed=True), packs)
        alone = {}
        for row in rows:
            alone[row["id"]] = per_sample_losses(model, collate([row], tokenizer.pad_token_id, packed=False), [row])[0]
    order = [sid for p in packs for sid in p["id"].split("+")]
    assert [round(x, 4) for x in packed] == [round(alone[sid], 4) for sid in order]


def test_pack_keeps_every_token_and_fills_sequences():
    rows = [{"id": str(i), "source": "task", "input_ids": [i] * n, "labels": [i] * n}
            for i, n in enumerate([100, 60, 40, 90, 10, 30, 70, 50, 25, 75] * 5)]
    packs = pack(rows, max_len=200)
    assert sum(map(len, (p["input_ids"] for p in packs))) == sum(len(r["input_ids"]) for r in rows)
    assert all(len(p["input_ids"]) <= 200 and sum(p["seq_lens"]) == len(p["input_ids"]) for p in packs)
    total = sum(len(r["input_ids"]) for r in rows)
    assert len(packs) <= -(-total // 200) + 1  # within one sequence of the optimum
    assert packing_efficiency(packs, 200) == total / (len(packs) * 200)


def test_block_causal_mask():
    m = block_causal_mask([2, 3], width=6)
    assert m[1, 0] and not m[0, 1]          # causal within the first sample
    assert not m[2, 1] and m[4, 2]          # the second sample cannot see the first
    assert m[5, 5] and not m[5, 4]          # padding attends only to itself
