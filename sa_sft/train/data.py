"""The trainer's data: one rank's Arrow shard, an epoch order that is a pure function of
(seed, epoch, rank), and micro-batches addressable by optimizer step (so resume is exact)."""
import random

from sa_sft.data.packing import collate


def epoch_order(num_rows: int, seed: int, epoch: int, rank: int) -> list[int]:
    order = list(range(num_rows))
    random.Random(f"{seed}/train/epoch{epoch}/rank{rank}").shuffle(order)
    return order


class RankData:
    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, seed: int, rank: int, pad_id: int,
                 packed: bool, varlen: bool = False):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.pad_id = pad_id
        self.packed = packed
        self.varlen = varlen  # packed batches by position ids alone (FlashAttention-2)
        self.steps_per_epoch = len(dataset) // (micro_batch_size * grad_accum)
        self._order_epoch, self._order = None, None

    def micro_batches(self, step: int) -> list[dict]:
        """The grad_accum micro-batches of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, epoch_order(len(self.dataset), self.seed, epoch, self.rank)
        per_step = self.micro_batch_size * self.grad_accum
        rows = self.dataset.select(self._order[index * per_step:(index + 1) * per_step])
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"], "seq_lens": r["seq_lens"]} for r in rows]
        return [collate(rows[i:i + self.micro_batch_size], self.pad_id, self.packed, self.varlen)
                for i in range(0, len(rows), self.micro_batch_size)]
