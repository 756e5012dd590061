"""Typed, validated configuration for every stage: YAML plus `key.sub=value` overrides.

Every field declares its type and, where it matters, its range or choices. Loading checks
unknown keys, types and ranges and fails with one line naming the key. Fields marked
`results=False` only change how a stage runs (resources, logging), never what it
produces, so they are left out of the stage fingerprints that decide skip/resume.
"""
import dataclasses
import re
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sa_sft.errors import UserError

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"

# Answers a chat model writes when it refuses; a self-dialogue ending in one teaches refusing.
DEFAULT_REFUSALS = (
    r"\bas an ai\b",
    r"\bi(?:'m| am) (?:sorry|unable|not able)\b.{0,40}\b(?:can(?:no|')t|unable|not able)\b",
    r"\bi can(?:no|')t (?:help|assist|provide|do) (?:with )?that\b",
)


def opt(default, *, min=None, max=None, results=True, help=""):
    """A config field with its range, whether it changes results, and a one-line help."""
    meta = {"min": min, "max": max, "results": results, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt("default", help="'default' (SmolLM2-135M-Instruct), 'tiny' (tests), a local HF folder, or a hub id "
                    "ORG/NAME (from the Hugging Face cache; downloaded when a hub is reachable and HF_HUB_OFFLINE is unset)")
    trust_remote_code: bool = opt(False, help="run Python code shipped with the model folder")


@dataclass
class ColumnsConfig:
    """Field (column) names of the data files' rows, for data that names them otherwise."""
    messages: str = opt("messages", help="messages form: the list of {role, content} turns")
    conversations: str = opt("conversations", help="ShareGPT form: the list of {from, value} turns")
    prompt: str = opt("instruction", help="alpaca form: the request")
    input: str = opt("input", help="alpaca form: optional text appended to the request")
    response: str = opt("output", help="alpaca form: the answer (`response` is read too while this is `output`)")
    system: str = opt("system", help="optional system prompt of a row, any form")
    answer: str = opt("answer", help="optional reference answer kept with a row")


@dataclass
class DataConfig:
    task_path: str = opt("builtin:gsm_symbolic", help="task data: JSONL, JSON, Parquet, a `datasets` save_to_disk folder, "
                         "hf:NAME[:SPLIT] or builtin:NAME; rows in messages, alpaca or ShareGPT form")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = opt(
        "auto", help="row form of data.task_path and data.external_path (auto: each row's fields decide)")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    on_bad_row: Literal["error", "skip"] = opt("error", help="a malformed task row stops the run or is skipped and counted")
    max_row_bytes: int = opt(16 * 2**20, min=1024, results=False, help="longest accepted line in a data file, in bytes (a longer one is a bad row)")
    max_task_samples: int = opt(0, min=0, help="use at most this many task rows (0: all)")
    heldout_task: int = opt(64, min=0, help="task rows held out for evaluation")
    heldout_self: int = opt(32, min=0, help="self-dialogues held out for evaluation")
    external_path: str = opt("", help="optional third source: general chat data (any form task_path takes) mixed at mix.external_ratio (the external-data baseline)")


@dataclass
class GenerateConfig:
    strategy: Literal["self_dialogue", "topic_prompted", "rewrite"] = opt(
        "self_dialogue", help="self_dialogue (Magpie-style), topic_prompted (asked for a question), rewrite (SDFT: task answers in its own words)")
    turns: int = opt(2, min=2, help="messages per dialogue, alternating user/assistant (2: one exchange)")
    num_samples: int = opt(256, min=-1, help="accepted self-dialogues to produce (training + held out); -1: what mix.self_ratio needs for the task set")
    shard_size: int = opt(64, min=1, help="dialogues per shard (the unit of work, resume and determinism)")
    temperature: float = opt(0.7, min=0.0, help="sampling temperature, both roles")
    top_p: float = opt(0.9, min=0.0, max=1.0, help="nucleus sampling, both roles")
    top_k: int = opt(-1, min=-1, help="top-k filter (-1: off)")
    fast_top_p: bool = opt(True, help="on CPU, exact top-p from a top-256 partial selection instead of a full-vocabulary sort")
    max_user_tokens: int = opt(128, min=1, help="token cap of a generated user turn")
    max_assistant_tokens: int = opt(256, min=1, help="token cap of a generated assistant turn")
    min_turn_chars: int = opt(8, min=0, help="shorter turns are rejected")
    drop_truncated: bool = opt(True, help="reject dialogues whose turns hit the token cap")
    keep_truncated_answers: bool = opt(True, help="keep a final answer cut at the token cap (its text is trained, no end-of-turn)")
    filter_wrong_role: bool = opt(True, help="reject turns that write a role header (the model speaking for the other side)")
    max_repeated_ngram_fraction: float = opt(0.5, min=0.0, max=1.0, help="reject turns whose repeated word 4-grams exceed this share (1: off)")
    refusal_patterns: list[str] = opt(list(DEFAULT_REFUSALS), help="regexes; an answer matching one is rejected ([]: off)")
    dedup: bool = opt(True, help="reject exact and near-duplicate user turns across all shards")
    near_dup_threshold: float = opt(0.8, min=0.0, max=1.0, help="Jaccard similarity of word 5-grams counted as a near duplicate (1: exact only)")
    contamination_paths: list[str] = opt([], help="JSONL evaluation sets; dialogues sharing a word n-gram with them are rejected")
    contamination_ngram: int = opt(8, min=3, help="n of the contamination n-gram check")
    engines: int = opt(1, min=1, results=False, help="data-parallel vLLM engines (Ray actors); evaluation scores and answers on them too")
    tensor_parallel_size: int = opt(1, min=1, results=False, help="devices per engine (generation and evaluation)")
    device: Literal["cpu", "cuda"] = opt("cpu", results=False, help="where engines run (generation and all of evaluation)")
    cpus_per_engine: int = opt(0, min=0, results=False, help="CPU cores per engine (0: split the machine's cores evenly)")
    kv_cache_gib: float = opt(2.0, min=0.1, results=False, help="CPU KV cache per engine (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = opt(0.85, min=0.05, max=1.0, results=False, help="GPU memory share per engine")
    max_num_seqs: int = opt(128, min=1, results=False, help="vLLM batch size cap per engine")
    schedule: Literal["shard", "stream"] = opt(
        "shard", results=False,
        help="shard: an engine runs one shard at a time (samples identical with any engine count and on resume); "
             "stream: shards join a running batch at once (engines never drain; samples then depend on timing)")
    enforce_eager: Literal["auto", True, False] = opt("auto", results=False, help="skip CUDA graph capture and compilation (auto: on CPU yes, a faster start; on cuda no, faster generation)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt("auto", help="engine dtype, generation and evaluation (auto: bfloat16 where the hardware has fast bf16, else float32)")
    max_shards: int = opt(0, min=0, results=False, help="stop after this many shards even if short (0: 4x the planned count)")


@dataclass
class MixConfig:
    self_ratio: float = opt(1.0, min=0.0, help="lambda: self-dialogue samples (or tokens) per task sample (or token); 0: task-only SFT")
    external_ratio: float = opt(0.0, min=0.0, help="external samples (or tokens) per task sample (or token), from data.external_path")
    ratio_unit: Literal["samples", "tokens"] = opt("samples", help="what the ratios count")
    num_proc: int = opt(0, min=0, results=False, help="processes that tokenize (0: one per idle core, i.e. cores less "
                        "the load average, with at least 4096 rows each)")


@dataclass
class TrainConfig:
    ranks: int = opt(2, min=1, help="data-parallel ranks (processes) in all; the mix is split per rank")
    launcher: Literal["torchrun", "deepspeed", "srun", "ray"] = opt(
        "torchrun", results=False,
        help="torchrun/deepspeed: ranks on this node; srun: ranks over the Slurm allocation; ray: ranks as Ray actors")
    device: Literal["cpu", "cuda"] = opt("cpu", results=False, help="accelerator (cpu uses DeepSpeed's CPU accelerator and gloo)")
    deepspeed_config: str = opt("zero3", help="preset in sa_sft/ds_configs/ (zero3, zero2, zero3_offload) or a JSON path")
    precision: Literal["auto", "bf16", "fp32"] = opt("auto", help="training precision (auto: bf16 on GPUs and CPUs with fast bf16, else fp32)")
    micro_batch_size: int = opt(4, min=1, help="samples per rank per forward pass")
    gradient_accumulation_steps: int = opt(1, min=1, help="micro-batches per optimizer step")
    learning_rate: float = opt(1e-5, min=0.0, help="peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, min=0.0, max=1.0, help="final lr as a fraction of the peak")
    weight_decay: float = opt(0.0, min=0.0)
    adam_beta1: float = opt(0.9, min=0.0, max=1.0)
    adam_beta2: float = opt(0.95, min=0.0, max=1.0)
    warmup_steps: int = opt(0, min=0, help="linear warm-up steps")
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine")
    max_grad_norm: float = opt(1.0, min=0.0, help="gradient clipping (0: off)")
    epochs: int = opt(1, min=1, help="passes over the mixed data (unless max_steps is set)")
    max_steps: int = opt(0, min=0, help="optimizer steps (0: as many as the epochs give)")
    max_seq_len: int = opt(1024, min=8, help="longer samples are truncated or dropped")
    overlong: Literal["truncate", "drop"] = opt("truncate", help="what to do with samples over max_seq_len")
    packing: bool = opt(False, help="pack samples into max_seq_len sequences (no attention across samples)")
    train_on_prompt: bool = opt(False, help="also put loss on system/user tokens")
    freeze_embeddings: bool = opt(False, help="freeze the token embeddings (and a tied output head)")
    freeze_layers: int = opt(0, min=0, help="freeze the bottom N transformer layers (layer-freezing baseline)")
    freeze_params: list[str] = opt([], help="regexes of parameter names to freeze")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt("sdpa", help="attention kernel")
    peak_tflops: float = opt(0.0, min=0.0, results=False, help="per-device peak for MFU (0: measure a matmul at start)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(
        ["tensorboard"], results=False,
        help="trackers that get every training metric line, the run config and the evaluation summary "
             "([]: none); wandb honours WANDB_MODE (offline: on disk only), mlflow MLFLOW_TRACKING_URI "
             "(unset: a file store in the run directory)")
    tracker_project: str = opt("", results=False, help="W&B project and MLflow experiment ('': $WANDB_PROJECT or "
                               "$MLFLOW_EXPERIMENT_NAME, else sa-sft); the tracker run is named after the run directory")
    checkpoint_every: int = opt(0, min=0, results=False, help="DeepSpeed checkpoint every N steps (0: by time only)")
    checkpoint_every_minutes: float = opt(-1.0, min=-1.0, results=False, help="also checkpoint when this many minutes passed since the last one (0: never; -1: 30 on cuda, never on cpu)")
    gradient_checkpointing: Literal["auto", True, False] = opt(
        "auto", results=False, help="recompute activations in the backward pass (auto: on for cuda, off on cpu)")
    keep_last: int = opt(2, min=1, results=False, help="checkpoints kept")
    log_every: int = opt(1, min=1, results=False, help="steps per line of the training metrics (JSONL)")
    threads_per_rank: int = opt(1, min=1, results=False, help="torch threads per rank on CPU")
    master_port: int = opt(0, min=0, max=65535, results=False, help="rendezvous port (0: a free one)")
    seed: int = opt(-1, min=-1, help="seed of the training data order (-1: the run seed); the held-out split and "
                    "generation keep the run seed, so runs that differ only here are scored on the same items")
    interpolate_from: str = opt("", help="WiSE-FT instead of training: a fine-tuned model folder (or a run directory) "
                                "whose weights are mixed with the base's at train.interpolate_alpha")
    interpolate_alpha: float = opt(0.5, min=0.0, max=1.0, help="WiSE-FT: (1 - alpha) x base + alpha x fine-tuned")
    lora_rank: int = opt(0, min=0, help="LoRA (peft) adapters of this rank on train.lora_targets instead of full "
                         "fine-tuning (0: full fine-tuning); the export merges them into plain weights")
    lora_alpha: float = opt(16.0, min=0.0, help="LoRA scaling numerator (the update is alpha / rank x B A)")
    lora_dropout: float = opt(0.0, min=0.0, max=1.0, help="dropout on the LoRA branch")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  help="module names that get adapters")


@dataclass
class EvaluateConfig:
    max_seq_len: int = opt(1024, min=8, help="longer held-out samples are truncated")
    suites: list[str] = opt([], help="general suites scored before and after: built-ins (mmlu, humaneval, ifeval, arithmetic), "
                            "mc:PATH / gen:PATH / ifeval:PATH JSONL, or lm_eval:TASK (lm-evaluation-harness)")
    max_items: int = opt(0, min=0, help="items per general suite (0: all)")
    mc_scoring: Literal["text", "letter"] = opt("text", help="multiple choice: most likely option text (cloze) or option letter")
    task_checker: str = opt("auto", help="in-domain accuracy of the held-out task answers generated with vLLM: "
                            "numeric, exact, label, python:FILE:FUNCTION, none, or auto (numeric for builtin:gsm_symbolic, "
                            "label for builtin:family_relationships, else none)")
    max_new_tokens: int = opt(512, min=1, help="longest generated answer in generation suites")
    allow_code_execution: bool = opt(False, help="let code suites (humaneval) run model-written code in the sandbox")
    code_timeout_s: float = opt(10.0, min=0.1, help="wall-clock limit per sandboxed program")
    drift: bool = opt(True, help="measure the weights' L2 drift from the base, per layer")
    chat_heldout: int = opt(0, min=0, max=400, help="fair retention: the base model's own answers to this many held-out "
                            "ShareGPT prompts (no method trains on them), scored as NLL under each model (0: off)")
    lm_eval_include_path: str = opt("", help="folder of lm-evaluation-harness task YAMLs for lm_eval:TASK suites (its --include_path)")
    lm_eval_num_fewshot: int = opt(-1, min=-1, help="few-shot examples in lm_eval:TASK suites (-1: the task's default)")
    lm_eval_chat_template: bool = opt(False, help="lm_eval:TASK suites render prompts with the model's chat template")
    lm_eval_backend: Literal["auto", "hf", "vllm"] = opt("auto", help="lm-eval's back end (auto: vllm on GPUs, hf on CPU)")
    lm_eval_batch_size: int = opt(8, min=1, results=False, help="lm-eval's batch size")


@dataclass
class CompareConfig:
    methods: list[str] = opt(["base", "task_only", "sa_sft", "freeze", "external"], results=False,
                             help="`sa-sft compare`'s methods: presets (base, task_only, task_only_low_lr, sa_sft, "
                                  "freeze, external, rewrite, lora, wise_ft), PRESET@VALUE (sa_sft@LAMBDA, wise_ft@ALPHA) "
                                  "and +seedN for another training data order (task_only+seed2)")


@dataclass
class ClusterConfig:
    ray_address: str = opt("", results=False, help="Ray cluster to join ('': $RAY_ADDRESS if set, else start a local one)")
    join_timeout_s: int = opt(300, min=1, results=False, help="Slurm: seconds for every node's Ray worker to join")
    port_base: int = opt(0, min=0, max=65000, results=False, help="Slurm: first of the job's ports (0: derived from the job id)")
    ray_object_store_gib: float = opt(2.0, min=0.1, results=False, help="Slurm: Ray object store per node")
    nodes: int = opt(0, min=0, results=False, help="nodes the run uses, for the planner (0: the Slurm job's, else 1)")
    gpus_per_node: int = opt(0, min=0, results=False, help="GPUs per node, for the planner (0: this node's)")
    gpu_memory_gib: float = opt(0.0, min=0.0, results=False, help="memory per GPU in GiB, for the planner (0: this node's)")


def train_seed(cfg) -> int:
    """The seed of the training data order: train.seed, else the run seed."""
    return cfg.train.seed if cfg.train.seed >= 0 else cfg.seed


@dataclass
class Config:
    output_dir: str = opt("runs/demo", help="the run directory")
    seed: int = opt(1234, help="run seed; every random choice derives from it")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def section_for_results(section) -> dict:
    """The fields of a section that can change a stage's output (fingerprint material)."""
    return {f.name: section_for_results(getattr(section, f.name)) if dataclasses.is_dataclass(getattr(section, f.name))
            else getattr(section, f.name) for f in dataclasses.fields(section) if f.metadata.get("results", True)}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Load a built-in (`demo`, `tiny`) or a YAML file, apply `key.sub=value` overrides, validate."""
    path = Path(name_or_path)
    if not path.exists() and "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        path = BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"no config file or built-in config named {name_or_path!r} "
                            f"(built-ins: {', '.join(builtin_names())})")
    if not path.is_file():
        raise UserError(f"config file {name_or_path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of config sections")
    for item in overrides:
        apply_override(raw, item)
    train = raw.get("train")
    if isinstance(train, dict):
        if "tensorboard" in train:
            raise UserError("config key train.tensorboard is now train.report_to, a list of trackers "
                            "(tensorboard, wandb, mlflow; [] for none)")
        if isinstance(train.get("report_to"), str):  # train.report_to=wandb: one tracker; empty: none
            train["report_to"] = [train["report_to"]] if train["report_to"] else []
    return resolve_auto(check_consistency(from_dict(Config, raw, prefix="")))


def check_consistency(cfg: "Config") -> "Config":
    """Checks that involve more than one key."""
    if cfg.generate.turns % 2:
        raise UserError(f"config key generate.turns must be even (dialogues end with the assistant); got {cfg.generate.turns}")
    if cfg.generate.strategy == "rewrite" and (cfg.mix.self_ratio or cfg.data.heldout_self):
        raise UserError("generate.strategy=rewrite replaces the task answers with the model's rewrites; "
                        "set mix.self_ratio=0 and data.heldout_self=0")
    if cfg.mix.external_ratio and not cfg.data.external_path:
        raise UserError("config key mix.external_ratio needs data.external_path")
    if cfg.train.lora_rank and (cfg.train.freeze_layers or cfg.train.freeze_embeddings or cfg.train.freeze_params):
        raise UserError("config key train.lora_rank trains only the adapters (the base weights are frozen); "
                        "train.freeze_layers, freeze_embeddings and freeze_params do not apply with it")
    checker = cfg.evaluate.task_checker
    if checker not in ("auto", "none", "numeric", "exact", "label") and not checker.startswith("python:"):
        raise UserError(f"config key evaluate.task_checker must be auto, none, numeric, exact, label or "
                        f"python:FILE:FUNCTION; got {checker!r}")
    if "humaneval" in cfg.evaluate.suites and not cfg.evaluate.allow_code_execution:
        raise UserError("evaluate.suites: humaneval runs model-written code; set evaluate.allow_code_execution=true "
                        "to run it in the sandbox (no network, limited memory and time)")
    if 0 <= cfg.generate.num_samples < cfg.data.heldout_self:
        raise UserError(f"config key generate.num_samples ({cfg.generate.num_samples}) must be at least "
                        f"data.heldout_self ({cfg.data.heldout_self})")
    return cfg


def resolve_auto(cfg: "Config") -> "Config":
    """Replace hardware-dependent `auto` values so the run directory records what really ran."""
    from sa_sft.hardware import gpu_memory_gib, resolve_engine_dtype, resolve_train_precision, visible_gpus
    cfg.generate.dtype = resolve_engine_dtype(cfg.generate.dtype, cfg.generate.device)
    cfg.train.precision = resolve_train_precision(cfg.train.precision, cfg.train.device)
    if cfg.generate.enforce_eager == "auto":
        cfg.generate.enforce_eager = cfg.generate.device == "cpu"
    on_gpu = cfg.train.device == "cuda"
    if cfg.train.gradient_checkpointing == "auto":
        cfg.train.gradient_checkpointing = on_gpu
    if cfg.train.checkpoint_every_minutes < 0:
        cfg.train.checkpoint_every_minutes = 30.0 if on_gpu else 0.0
    c = cfg.cluster
    if not c.nodes:
        c.nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if not c.gpus_per_node:
        c.gpus_per_node = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) or visible_gpus()
    if not c.gpu_memory_gib:
        c.gpu_memory_gib = gpu_memory_gib()
    return cfg


def apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r} must look like key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


def from_dict(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '<top level>'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = from_dict(kind, raw[name], prefix=f"{prefix}{name}.")
        else:
            values[name] = check_value(f"{prefix}{name}", raw[name], kind, f.metadata)
    return cls(**values)


INT_TEXT = re.compile(r"^[+-]?\d[\d_]*$")
FLOAT_TEXT = re.compile(r"^[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def check_value(key: str, value, kind, meta):
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise UserError(f"config key {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if origin is list:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list; got {value!r}")
        return [check_value(f"{key}[{i}]", v, item_kind, {}) for i, v in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key} must be true or false; got {value!r}")
        return value
    if kind is int:
        if isinstance(value, str) and INT_TEXT.match(value.strip()):
            value = int(value.strip().replace("_", ""))
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key} must be an integer; got {value!r}")
    elif kind is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string: numbers as people write them are numbers here.
        if isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
            value = float(value.strip().replace("_", ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key} must be a number; got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config key {key} must be a string; got {value!r}")
        value = str(value)
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise UserError(f"config key {key} must be >= {lo}; got {value}")
    if hi is not None and value > hi:
        raise UserError(f"config key {key} must be <= {hi}; got {value}")
    return value


def describe_keys(cls=Config, prefix="") -> list[str]:
    """`key (type, default): help` lines for --help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            lines += describe_keys(kind, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} = {default!r}" + (f"  # {help_text}" if help_text else ""))
    return lines
