"""LoRA (Hu et al., 2021) through `peft`: low-rank adapters on the linear layers, the base weights frozen.

The export is a plain Hugging Face model like every other run's: each adapted weight is merged
(W + alpha/r x B @ A, in fp32, cast back) as it is gathered, so evaluation, drift and WiSE-FT read it
unchanged and no process ever holds the whole model. The same merge feeds the exact export check.
"""
from sa_sft.config import TrainConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def add_adapters(model, tcfg: TrainConfig):
    """The model wrapped by peft with adapters on `train.lora_targets`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                        target_modules=list(tcfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def export_name(name: str) -> str | None:
    """The base model's name of a peft parameter or buffer; None for an adapter's own weights."""
    if ".lora_" in name:
        return None
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merged_parameters(model):
    """(export name, [parameters to gather], merge) for every parameter of a peft model, in a fixed
    order: an adapted weight comes with its A and B and is merged; any other parameter is itself."""
    for name, param in model.named_parameters():
        out = export_name(name)
        if out is None:
            continue
        if name.endswith(".base_layer.weight"):
            layer = model.get_submodule(name.removesuffix(".base_layer.weight"))
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            scale = layer.scaling[ADAPTER]
            merge = lambda w, a, b, s=scale: (w.float() + s * (b.float() @ a.float())).to(w.dtype)
            yield out, [param, a, b], merge
        else:
            yield out, [param], lambda w: w
