"""The trainer's data: one rank's Arrow shard, an epoch order that is a pure function of
(seed, epoch, rank), and padded micro-batches."""
import random

import torch

from sa_sft.chat import IGNORE_INDEX


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int) -> list[int]:
    order = list(range(num_samples))
    random.Random(f"{seed}/train/epoch{epoch}/rank{rank}").shuffle(order)
    return order


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest row; padding carries no loss and no attention."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class RankData:
    """Micro-batches for one rank, addressable by global optimizer step (so resume is exact)."""

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, seed: int, rank: int, pad_id: int):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.pad_id = pad_id
        self.steps_per_epoch = len(dataset) // (micro_batch_size * grad_accum)
        self._order_epoch, self._order = None, None

    def micro_batches(self, step: int) -> list[dict]:
        """The grad_accum micro-batches of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, epoch_order(len(self.dataset), self.seed, epoch, self.rank)
        per_step = self.micro_batch_size * self.grad_accum
        ids = self._order[index * per_step:(index + 1) * per_step]
        rows = self.dataset.select(ids)
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        return [collate(rows[i:i + self.micro_batch_size], self.pad_id)
                for i in range(0, len(rows), self.micro_batch_size)]
