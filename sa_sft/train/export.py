"""The exported model and its exact check.

The export is a Hugging Face folder (safetensors, config, tokenizer, chat template, generation
config) written atomically. The check compares every exported tensor with the trained
engine's own parameter, one tensor at a time: bit for bit, at any precision, with no second
copy of the model and no forward pass (two bf16 forward passes differ by rounding noise, so a
logit comparison cannot tell a broken export from a correct one).
"""
import contextlib
import json
from pathlib import Path
from typing import Iterable

import torch

from sa_sft.io import atomic_write_json

SAFETENSORS_INDEX = "model.safetensors.index.json"


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index (sharded) or the headers."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update({name: path for name in f.keys()})
    return files


def compare_tensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Compare each (name, tensor) with the exported tensor of that name, reading one at a time.

    Returns {"tensors": compared, "max_abs_diff", "mismatched": ["name: why", ...]}. Names only
    the caller knows are reported missing; the caller checks the other direction."""
    from safetensors import safe_open

    files = tensor_files(folder)
    compared, max_diff, mismatched = 0, 0.0, []
    with contextlib.ExitStack() as stack:
        handles = {}
        for name, tensor in tensors:
            if name not in files:
                mismatched.append(f"{name}: not in the export")
                continue
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            exported = handles[path].get_tensor(name)
            tensor = tensor.detach().to("cpu")
            compared += 1
            if exported.shape != tensor.shape or exported.dtype != tensor.dtype:
                mismatched.append(f"{name}: exported {tuple(exported.shape)} {exported.dtype}, "
                                  f"trained {tuple(tensor.shape)} {tensor.dtype}")
            elif not torch.equal(exported, tensor):
                diff = (exported.double() - tensor.double()).abs().max().item()
                max_diff = max(max_diff, diff)
                mismatched.append(f"{name}: max |difference| {diff:.3g}")
    return {"tensors": compared, "max_abs_diff": max_diff, "mismatched": mismatched}


def merge_checks(parts: list[dict], expected: set[str], folder: Path) -> dict:
    """One verdict from every rank's share: also every tensor of the export must be a trained one."""
    unexpected = sorted(set(tensor_files(folder)) - expected)
    return {"tensors": sum(p["tensors"] for p in parts),
            "max_abs_diff": max((p["max_abs_diff"] for p in parts), default=0.0),
            "mismatched": [m for p in parts for m in p["mismatched"]]
            + [f"{name}: in the export but not a trained parameter or buffer" for name in unexpected]}


class ShardWriter:
    """Writes a Hugging Face safetensors folder one tensor at a time, in shards of at most
    `max_shard_bytes`: only the current shard is ever in memory. `close` names the shards
    (model-00001-of-0000N.safetensors) and writes the index, as `save_pretrained` would."""

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 1024**3):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_shard_bytes:
            self.flush()
        self.current[name] = tensor.detach().to("cpu").contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        save_file(self.current, str(self.folder / f".shard-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        count = len(self.files)
        if count == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, name in enumerate(names):
            (self.folder / f".shard-{i:05d}.safetensors").rename(self.folder / name)
        if count > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self.files) for tensor in tensors}
            atomic_write_json(self.folder / SAFETENSORS_INDEX,
                              {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


def write_model_files(folder: Path, config, generation_config, tokenizer) -> None:
    """Everything of the Hugging Face folder but the weights: config, generation config, tokenizer.
    The config says `use_cache`: training turned it off, inference wants it."""
    import copy

    config = copy.deepcopy(config)
    config.use_cache = True
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
