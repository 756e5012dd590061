"""WiSE-FT (Wortsman et al., 2022): the base weights moved a fraction alpha of the way to a fine-tuned
model's, theta = (1 - alpha) * base + alpha * fine_tuned. No training; one tensor at a time, so no
process holds either model whole. The folder is a normal export (config, tokenizer from the
fine-tuned model), written beside the destination and renamed into place."""
import json
import shutil
from pathlib import Path

import torch

from sa_sft.errors import UserError
from sa_sft.train.export import SAFETENSORS_INDEX, ShardWriter, tensor_files


def interpolate(base: Path, fine_tuned: Path, alpha: float, out: Path) -> dict:
    from safetensors import safe_open

    base_files, tuned_files = tensor_files(base), tensor_files(fine_tuned)
    if not tuned_files:
        raise UserError(f"train.interpolate_from: {fine_tuned} holds no safetensors weights; train that run first")
    if set(base_files) != set(tuned_files):
        missing = sorted(set(base_files) ^ set(tuned_files))[:3]
        raise UserError(f"train.interpolate_from: {fine_tuned} and the base model {base} have different tensors "
                        f"({', '.join(missing)}, ...): not the same architecture")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp)
    handles = {}
    try:
        for name, path in tuned_files.items():
            for p in (path, base_files[name]):
                if p not in handles:
                    handles[p] = safe_open(str(p), framework="pt")
            tuned = handles[path].get_tensor(name)
            start = handles[base_files[name]].get_tensor(name)
            mixed = torch.lerp(start.float(), tuned.float(), alpha)  # start + alpha * (tuned - start)
            writer.add(name, mixed.to(tuned.dtype))
        writer.close()
    finally:
        handles.clear()
    for file in fine_tuned.iterdir():  # config, generation config, tokenizer, chat template
        if file.is_file() and file.suffix != ".safetensors" and file.name != SAFETENSORS_INDEX:
            shutil.copyfile(file, tmp / file.name)
    (tmp / "wise_ft.json").write_text(json.dumps({"base": str(base), "fine_tuned": str(fine_tuned), "alpha": alpha}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"tensors": len(tuned_files), "alpha": alpha, "fine_tuned": str(fine_tuned)}
