"""Layer freezing (the paper's baseline): embeddings, the bottom N layers, or parameters by name.

`check_freeze_settings` runs in preflight from the model folder's config and safetensors
headers alone (no weights loaded), so a bad setting is one line before any stage starts,
not a dead training rank.
"""
import json
import re
from pathlib import Path

from sa_sft.config import TrainConfig
from sa_sft.errors import UserError


def num_layers(model_path: Path) -> int | None:
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    return config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")


def parameter_names(model_path: Path) -> list[str]:
    """The tensor names of a model folder's safetensors files, read from their headers."""
    from safetensors import safe_open

    names = []
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names += list(f.keys())
    return names


def compiled_patterns(tcfg: TrainConfig) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in tcfg.freeze_params]
    except re.error as e:
        raise UserError(f"config key train.freeze_params: {e.pattern!r} is not a valid regex ({e})") from None


def check_freeze_settings(tcfg: TrainConfig, model_path: Path) -> None:
    layers = num_layers(model_path)
    if tcfg.freeze_layers and layers is not None and tcfg.freeze_layers > layers:
        raise UserError(f"config key train.freeze_layers={tcfg.freeze_layers} but the model has {layers} layers")
    patterns = compiled_patterns(tcfg)
    if patterns:
        names = parameter_names(model_path)
        if not any(p.search(name) for p in patterns for name in names):
            raise UserError(f"config key train.freeze_params {tcfg.freeze_params} matched no parameter of "
                            f"{model_path} (e.g. {names[0] if names else 'none'})")


def freeze_parameters(model, tcfg: TrainConfig) -> list[str]:
    """Freeze embeddings, the bottom N layers and/or named parameters; returns the frozen names."""
    import torch.nn as nn

    frozen_ids = set()
    if tcfg.freeze_embeddings:
        frozen_ids |= {id(p) for p in model.get_input_embeddings().parameters()}
    if tcfg.freeze_layers:
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList)
                       and len(m) == model.config.num_hidden_layers), None)
        if layers is None or tcfg.freeze_layers > len(layers):
            raise UserError(f"config key train.freeze_layers={tcfg.freeze_layers} but the model has "
                            f"{model.config.num_hidden_layers} layers")
        for layer in layers[: tcfg.freeze_layers]:
            frozen_ids |= {id(p) for p in layer.parameters()}
    patterns = compiled_patterns(tcfg)
    names = []
    for name, param in model.named_parameters():
        if id(param) in frozen_ids or any(p.search(name) for p in patterns):
            param.requires_grad_(False)
            names.append(name)
    if patterns and not any(p.search(n) for p in patterns for n in names):
        raise UserError(f"config key train.freeze_params {tcfg.freeze_params} matched no parameter")
    return names
