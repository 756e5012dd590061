"""DeepSpeed configs: presets in sa_sft/ds_configs/ (package data) whose "auto" fields are filled from the
trainer config."""
import copy
import json
from pathlib import Path

from sa_sft.config import TrainConfig
from sa_sft.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def load_preset(name_or_path: str) -> tuple[Path, dict]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise UserError(f"train.deepspeed_config: {name_or_path} is neither a preset ({presets}) nor a JSON file")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


# On CPU no bucket is smaller than this many elements (100 MB in bf16): DeepSpeed's own default
# prefetch size, and where gloo's per-call cost stops mattering (benchmarks/README.md, "Training").
CPU_MIN_BUCKET = 50_000_000


def auto_values(tcfg: TrainConfig, hidden_size: int) -> dict:
    """What each "auto" field becomes, keyed by its dotted path in the DeepSpeed config (None: the field
    is left out, DeepSpeed's default).

    ZeRO sizes follow the Hugging Face integration's "auto" (also LLaMA-Factory's): buckets of
    hidden² elements, prefetch 0.9·hidden², parameters under 10·hidden (norms, biases) kept whole on
    every rank. On GPUs (7B: 16.8M-element buckets, 70B: 67M) NCCL overlaps these with the compute,
    and gradients are reduced in fp32 (bf16 sums of many ranks lose precision) by reduce-scatter (half
    the traffic of an all-reduce). On CPU gloo overlaps nothing and every collective is a
    synchronisation of all ranks, so a small model's hidden² buckets (0.3M elements at hidden 576:
    ~240 reduce-scatters per backward) cost more than their bytes: buckets are at least CPU_MIN_BUCKET,
    and gradients are all-reduced, because gloo's reduce-scatter is slower than its all-reduce (1.4-2.6x
    on the same bf16 buffers here; benchmarks/training.py measures it). Either way the whole model stays gathered from forward to backward
    while it is under stage3_max_live_parameters / stage3_max_reuse_distance (1e9 in the presets)."""
    h2 = hidden_size * hidden_size
    gpu = tcfg.device == "cuda"
    bucket = (lambda n: int(n)) if gpu else (lambda n: max(int(n), CPU_MIN_BUCKET))
    return {
        "communication_data_type": "fp32" if gpu and tcfg.precision == "bf16" else None,
        "zero_optimization.overlap_comm": gpu,
        "zero_optimization.reduce_scatter": gpu,
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.gradient_accumulation_steps,
        "gradient_clipping": tcfg.max_grad_norm,
        "bf16.enabled": tcfg.precision == "bf16",
        "fp16.enabled": False,
        "optimizer.params.lr": tcfg.learning_rate,
        "optimizer.params.betas": [tcfg.adam_beta1, tcfg.adam_beta2],
        "optimizer.params.weight_decay": tcfg.weight_decay,
        "zero_optimization.reduce_bucket_size": bucket(h2),
        "zero_optimization.allgather_bucket_size": bucket(h2),
        "zero_optimization.stage3_prefetch_bucket_size": bucket(0.9 * h2),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "zero_optimization.offload_optimizer.pin_memory": tcfg.device == "cuda",
        "zero_optimization.offload_param.pin_memory": tcfg.device == "cuda",
    }


def fill_auto(config: dict, values: dict, source: str) -> dict:
    out = copy.deepcopy(config)

    def walk(node, prefix):
        for key, value in list(node.items()):
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif value == "auto":
                if dotted not in values:
                    raise UserError(f"{source}: no value known for \"auto\" at {dotted}; set it explicitly")
                if values[dotted] is None:
                    del node[key]
                else:
                    node[key] = values[dotted]

    walk(out, "")
    return out


def build_ds_config(tcfg: TrainConfig, hidden_size: int) -> dict:
    path, preset = load_preset(tcfg.deepspeed_config)
    config = fill_auto(preset, auto_values(tcfg, hidden_size), str(path))
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 0-3; got {stage}")
    return config
