"""How far fine-tuning moved the weights: L2 distance from the base, in total and per layer,
relative to the base weights' norm (the paper's "parameter drift", measured per run)."""
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from sa_sft.errors import UserError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_of(name: str) -> str:
    """`layer.07` for a transformer block's tensors, else the tensor's role (embed, norm, lm_head)."""
    match = LAYER.search(name)
    if match:
        return f"layer.{int(match.group(1)):02d}"
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    return "other"


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, key) over every safetensors file of a model folder; names without the `model.` prefix."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights to measure drift against")
    found = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                found[key.removeprefix("model.")] = (f, key)
    return found


def weight_drift(base: Path, final: Path) -> dict:
    """Streams tensor by tensor, so two 70B checkpoints never need to be in memory at once."""
    base_t, final_t = tensors(base), tensors(final)
    shared = sorted(set(base_t) & set(final_t))
    if not shared:
        raise UserError(f"{base} and {final} share no tensor names; is the fine-tuned model from this base?")
    diff_sq, base_sq = defaultdict(float), defaultdict(float)
    for name in shared:
        (bf, bk), (ff, fk) = base_t[name], final_t[name]
        with safe_open(bf, framework="pt") as hb, safe_open(ff, framework="pt") as hf:
            b, f = hb.get_tensor(bk).double(), hf.get_tensor(fk).double()
        if b.shape != f.shape:
            raise UserError(f"drift: tensor {name} is {tuple(b.shape)} in the base and {tuple(f.shape)} after training")
        group = group_of(name)
        diff_sq[group] += float(torch.sum((f - b) ** 2))
        base_sq[group] += float(torch.sum(b ** 2))
    per_group = {g: {"l2": round(math.sqrt(diff_sq[g]), 6),
                     "relative": round(math.sqrt(diff_sq[g]) / max(math.sqrt(base_sq[g]), 1e-12), 8)}
                 for g in sorted(diff_sq)}
    total_diff, total_base = sum(diff_sq.values()), sum(base_sq.values())
    return {"l2": round(math.sqrt(total_diff), 6), "relative": round(math.sqrt(total_diff / max(total_base, 1e-24)), 8),
            "tensors": len(shared), "per_group": per_group}
