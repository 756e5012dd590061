"""Packing tokenized samples into fixed-length sequences, and the masks that keep them apart.

A pack is a row whose `seq_lens` lists the lengths of the samples laid end to end in it.
The trainer restarts position ids at every sample and gives each token a causal mask over
its own sample only (a block-diagonal mask), so a packed sample's loss equals its loss
alone.
"""
import torch

from sa_sft.chat import IGNORE_INDEX


def pack_plan(lengths: list[int], max_len: int, window: int = 512) -> list[list[int]]:
    """The packs, each as the positions of its samples: first-fit-decreasing over consecutive windows
    of the (already shuffled) samples, from their lengths alone.

    Windows keep the data order's randomness at large scale while the bin packing within a
    window fills sequences to >95% on typical SFT length distributions.
    """
    packs = []
    for start in range(0, len(lengths), window):
        bins: list[list[int]] = []
        room: list[int] = []
        # sorted() is stable: samples of equal length keep their order.
        for i in sorted(range(start, min(start + window, len(lengths))), key=lambda i: -lengths[i]):
            n = lengths[i]
            target = next((b for b, r in enumerate(room) if r >= n), None)
            if target is None:
                bins.append([i])
                room.append(max_len - n)
            else:
                bins[target].append(i)
                room[target] -= n
        packs += bins
    return packs


def pack(samples: list[dict], max_len: int, window: int = 512) -> list[dict]:
    """The packs of `pack_plan` as rows: the samples' ids, tokens, labels, lengths and sources laid end to end."""
    packs = []
    for members in pack_plan([len(s["input_ids"]) for s in samples], max_len, window):
        members = [samples[i] for i in members]
        packs.append({
            "id": "+".join(s["id"] for s in members),
            "input_ids": [t for s in members for t in s["input_ids"]],
            "labels": [t for s in members for t in s["labels"]],
            "seq_lens": [len(s["input_ids"]) for s in members],
            "sources": [s["source"] for s in members],
        })
    return packs


def packing_efficiency(packs: list[dict], max_len: int) -> float:
    return sum(len(p["input_ids"]) for p in packs) / max(1, len(packs) * max_len)


def position_ids(seq_lens: list[int], width: int) -> torch.Tensor:
    pos = torch.cat([torch.arange(n) for n in seq_lens]) if seq_lens else torch.zeros(0, dtype=torch.long)
    return torch.nn.functional.pad(pos, (0, width - len(pos)))


def block_causal_mask(seq_lens: list[int], width: int) -> torch.Tensor:
    """[width, width] bool: token i may attend to token j iff same sample and j <= i. Padding sees itself."""
    segment = torch.full((width,), -1, dtype=torch.long)
    offset = 0
    for k, n in enumerate(seq_lens):
        segment[offset:offset + n] = k
        offset += n
    same = segment[:, None] == segment[None, :]
    mask = same & torch.ones(width, width, dtype=torch.bool).tril()
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves, never to data
    return mask


def collate(rows: list[dict], pad_id: int, packed: bool, varlen: bool = False) -> dict:
    """Right-pad to the longest row. Packed batches get per-sample position ids and a 4D
    block-diagonal causal mask, or with `varlen` (FlashAttention-2) position ids alone: the kernel
    finds each sample's boundaries where they restart at 0 (a padding token, at position 0, is a
    sequence of its own), with no width x width mask. Plain batches get a 2D padding mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
    real = labels.new_zeros(labels.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        real[i, :len(r["input_ids"])] = True
    # real_tokens, num_samples and loss_tokens are bookkeeping for the trainer, not model inputs. The
    # loss tokens are the labels the model predicts (each label but a row's first: the shift).
    batch = {"input_ids": ids, "labels": labels, "real_tokens": real,
             "num_samples": sum(len(r.get("seq_lens") or [0]) for r in rows),
             "loss_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    if packed:
        lens = [r.get("seq_lens") or [len(r["input_ids"])] for r in rows]
        batch["position_ids"] = torch.stack([position_ids(l, width) for l in lens])
        if not varlen:
            batch["attention_mask"] = torch.stack([block_causal_mask(l, width) for l in lens]).unsqueeze(1)
    else:
        batch["attention_mask"] = real.long()
    return batch
