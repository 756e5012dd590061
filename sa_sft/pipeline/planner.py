"""The memory and layout planner: will this model train and generate on this cluster, per GPU?

Everything is arithmetic on the model's `config.json` and the config (no weights, no GPU), so
`sa-sft plan` runs anywhere and preflight refuses a layout that cannot fit before a job waits
in a queue. Bytes per GPU:

  training (DeepSpeed ZeRO, bf16 with fp32 master weights and gradients, AdamW), P parameters
  over N ranks, as DeepSpeed's own estimator counts them (`estimate_zero3_model_states_mem_needs`):
    ZeRO-3           parameters 2P/N, gradients 4P/N, optimizer 12P/N, plus the largest layer
                     gathered whole (4 bytes per parameter: bf16 weights and gradients)
    ZeRO-3 + offload parameters and optimizer in CPU memory; the gathered largest layer stays
    ZeRO-2           parameters 2P (replicated), gradients and optimizer 16P/N
    activations      with checkpointing: every layer's input (2 bytes x hidden per token) plus one
                     layer recomputed; without: every layer's saved tensors (norm inputs/outputs,
                     q/k/v, attention output, SwiGLU gate/up/product: 6h + 2kv + 4I values per token,
                     bf16; sdpa/flash attention keep no sequence x sequence matrix); plus the logits
                     of the micro batch (bf16, their fp32 copy and its gradient: 10 bytes per entry)
    reserve          CUDA context, NCCL buffers, allocator fragmentation
  generation (vLLM), per GPU of a tensor-parallel engine: weights 2P/tp, the KV cache for one
  sequence of the longest context at least (2 x layers x kv heads x head dim x 2 bytes per token,
  the heads split over tp), within generate.gpu_memory_utilization of the GPU.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sa_sft.config import Config
from sa_sft.errors import UserError

GIB = 1024**3
RESERVE_BYTES = 4 * GIB            # CUDA context + NCCL buffers + allocator slack, per GPU
ENGINE_OVERHEAD_BYTES = 2 * GIB    # vLLM's activation workspace and CUDA graphs, per GPU


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, read from a Hugging Face `config.json`."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelShape":
        config = config.get("text_config", config)
        try:
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            return cls(name=name, vocab=config["vocab_size"], hidden=hidden, layers=config["num_hidden_layers"],
                       heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                       head_dim=config.get("head_dim") or hidden // heads,
                       intermediate=config["intermediate_size"], tied=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))
        except KeyError as e:
            raise UserError(f"{name}: config.json has no {e.args[0]}; the planner needs a decoder-only "
                            "transformer's sizes (hidden_size, num_hidden_layers, ...)") from None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.embedding_params * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The largest tensor group DeepSpeed gathers at once: the embedding (or the output head) or a layer."""
        return max(self.embedding_params, self.layer_params)


def read_model_shape(path: Path) -> ModelShape:
    config_path = Path(path) / "config.json"
    try:
        return ModelShape.from_config(json.loads(config_path.read_text(encoding="utf-8")), name=str(path))
    except FileNotFoundError:
        raise UserError(f"model.path: {path} has no config.json") from None
    except ValueError as e:
        raise UserError(f"model.path: {config_path} is not valid JSON ({e})") from None


@dataclass
class Row:
    part: str
    gib: float
    note: str = ""


@dataclass
class Check:
    """One side of the plan (training, or one generation engine): its rows per GPU and the verdict."""
    name: str
    rows: list[Row]
    capacity_gib: float
    layout: str
    fix: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(r.gib for r in self.rows)

    @property
    def fits(self) -> bool:
        return not self.problems and self.total_gib <= self.capacity_gib


@dataclass(frozen=True)
class ZeroLayout:
    stage: int
    offload_optimizer: bool
    offload_params: bool


def zero_layout(cfg: Config) -> ZeroLayout:
    from sa_sft.train.ds_config import load_preset
    _, preset = load_preset(cfg.train.deepspeed_config)
    zero = preset.get("zero_optimization", {})
    offloaded = lambda key: zero.get(key, {}).get("device", "none") in ("cpu", "nvme")
    return ZeroLayout(int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param"))


def training_check(cfg: Config, shape: ModelShape, gpus: int, gpu_gib: float) -> Check:
    tcfg = cfg.train
    n, p = max(1, tcfg.ranks), shape.params
    layout = zero_layout(cfg)
    rows = []
    if layout.stage == 3:
        rows.append(Row("parameters (bf16)", 0 if layout.offload_params else 2 * p / n / GIB,
                        "in CPU memory" if layout.offload_params else f"2 bytes x {p / 1e9:.2f}B / {n} ranks"))
        rows.append(Row("gradients (fp32)", 0 if layout.offload_optimizer else 4 * p / n / GIB,
                        "in CPU memory" if layout.offload_optimizer else "4 bytes per parameter / ranks"))
        rows.append(Row("optimizer (fp32 master, Adam m, v)", 0 if layout.offload_optimizer else 12 * p / n / GIB,
                        "in CPU memory" if layout.offload_optimizer else "12 bytes per parameter / ranks"))
        rows.append(Row("largest layer gathered", 4 * shape.largest_layer_params / GIB,
                        f"{shape.largest_layer_params / 1e6:.0f}M parameters, weights and gradients"))
    else:
        replicated = 2 * p if layout.stage == 2 else 4 * p if layout.stage == 1 else 16 * p
        sharded = 16 * p if layout.stage == 2 else 12 * p if layout.stage == 1 else 0
        rows.append(Row(f"parameters{' and gradients' if layout.stage < 2 else ''} (replicated)", replicated / GIB,
                        f"ZeRO-{layout.stage}"))
        if sharded:
            rows.append(Row("gradients and optimizer (sharded)" if layout.stage == 2 else "optimizer (sharded)",
                            0 if layout.offload_optimizer else sharded / n / GIB,
                            "in CPU memory" if layout.offload_optimizer else f"/ {n} ranks"))
    tokens = tcfg.micro_batch_size * tcfg.max_seq_len
    per_layer = 2 * (6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) * tokens
    checkpointing = tcfg.gradient_checkpointing is True
    if checkpointing:
        rows.append(Row("activations (checkpointed)", (2 * shape.hidden * tokens * shape.layers + per_layer) / GIB,
                        f"each layer's input + one layer recomputed; {tcfg.micro_batch_size} x {tcfg.max_seq_len} tokens"))
    else:
        rows.append(Row("activations", per_layer * shape.layers / GIB,
                        f"{shape.layers} layers x {tcfg.micro_batch_size} x {tcfg.max_seq_len} tokens, no checkpointing"))
    rows.append(Row("logits and loss", 10 * tokens * shape.vocab / GIB, f"{tokens} tokens x {shape.vocab} vocabulary"))
    rows.append(Row("reserve", RESERVE_BYTES / GIB, "CUDA context, NCCL, allocator"))
    nodes = math.ceil(n / max(1, cfg.cluster.gpus_per_node or 1))
    check = Check("training", rows, gpu_gib, f"{n} ranks (ZeRO-{layout.stage}"
                  + (", offload" if layout.offload_optimizer or layout.offload_params else "") + f") on {nodes} node(s)")
    if n > gpus:
        check.problems.append(f"train.ranks={n} but the cluster has {gpus} GPU(s) (cluster.nodes x cluster.gpus_per_node)")
    if not check.fits or check.problems:
        check.fix = training_fix(cfg, layout, checkpointing, check)
    return check


def training_fix(cfg: Config, layout: ZeroLayout, checkpointing: bool, check: Check) -> str:
    if check.problems:
        return "add nodes (cluster.nodes) or lower train.ranks"
    fixes = []
    acts = sum(r.gib for r in check.rows if r.part.startswith(("activations", "logits")))
    if not checkpointing and acts > 0.25 * check.capacity_gib:
        fixes.append("train.gradient_checkpointing=true")
    if cfg.train.micro_batch_size > 1 and acts > 0.25 * check.capacity_gib:
        fixes.append("a smaller train.micro_batch_size (with more train.gradient_accumulation_steps)")
    fixes.append("more nodes (train.ranks = cluster.nodes x cluster.gpus_per_node)")
    if not (layout.offload_optimizer and layout.offload_params):
        fixes.append("train.deepspeed_config=zero3_offload (optimizer and parameters in CPU memory)")
    return "; or ".join(fixes)


def generation_check(cfg: Config, shape: ModelShape, gpus: int, gpu_gib: float, max_model_len: int) -> Check:
    g = cfg.generate
    tp = g.tensor_parallel_size
    weights = 2 * shape.params / tp
    kv_per_token = 2 * shape.layers * shape.kv_dim * 2 / min(tp, shape.kv_heads)
    budget = g.gpu_memory_utilization * gpu_gib * GIB
    kv_room = budget - weights - ENGINE_OVERHEAD_BYTES
    rows = [Row("weights (bf16)", weights / GIB, f"{shape.params / 1e9:.2f}B parameters / tensor parallel {tp}"),
            Row("engine workspace", ENGINE_OVERHEAD_BYTES / GIB, "activations, CUDA graphs"),
            Row("KV cache (the rest)", max(kv_room, 0) / GIB,
                f"{max(kv_room, 0) / kv_per_token:,.0f} tokens at {kv_per_token / 1024:.0f} KiB each")]
    check = Check("generation", rows, g.gpu_memory_utilization * gpu_gib,
                  f"{g.engines} engine(s) x {tp} GPU(s)")
    if kv_room < kv_per_token * max_model_len:
        check.problems.append(f"an engine's KV cache holds {max(kv_room, 0) / kv_per_token:,.0f} tokens, less than "
                              f"one {max_model_len}-token sequence")
        check.fix = "a larger generate.tensor_parallel_size, or a higher generate.gpu_memory_utilization"
    if g.engines * tp > gpus:
        check.problems.append(f"generate.engines x generate.tensor_parallel_size = {g.engines * tp} GPUs, but the "
                              f"cluster has {gpus}")
        check.fix = "fewer generate.engines (or more nodes)"
    if shape.kv_heads % tp and tp % shape.kv_heads:
        check.problems.append(f"generate.tensor_parallel_size={tp} does not divide the {shape.kv_heads} KV heads")
        check.fix = "a tensor_parallel_size that divides the KV heads"
    return check


@dataclass
class Plan:
    shape: ModelShape
    nodes: int
    gpus_per_node: int
    gpu_gib: float
    checks: list[Check]

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.checks)


def make_plan(cfg: Config, shape: ModelShape, max_model_len: int) -> Plan:
    c = cfg.cluster
    gpus = c.nodes * c.gpus_per_node
    checks = []
    if cfg.train.device == "cuda":
        checks.append(training_check(cfg, shape, gpus, c.gpu_memory_gib))
    if cfg.generate.device == "cuda":
        checks.append(generation_check(cfg, shape, gpus, c.gpu_memory_gib, max_model_len))
    return Plan(shape, c.nodes, c.gpus_per_node, c.gpu_memory_gib, checks)


def render(plan: Plan) -> str:
    s = plan.shape
    lines = [f"model {s.name}: {s.params / 1e9:.2f}B parameters, {s.layers} layers, hidden {s.hidden}, "
             f"{s.heads} heads ({s.kv_heads} KV), vocabulary {s.vocab}",
             f"cluster: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) x {plan.gpu_gib:g} GiB", ""]
    for check in plan.checks:
        lines += [f"{check.name}: {check.layout}, per GPU", "", "| part | GiB | |", "|---|---:|---|"]
        lines += [f"| {r.part} | {r.gib:.1f} | {r.note} |" for r in check.rows]
        verdict = "fits" if check.fits else "DOES NOT FIT"
        lines += [f"| **total** | **{check.total_gib:.1f}** | of {check.capacity_gib:.1f} GiB: {verdict} |", ""]
        lines += [f"- {p}" for p in check.problems]
        if check.fix:
            lines += [f"- fix: {check.fix}"]
        if check.problems or check.fix:
            lines.append("")
    if not plan.checks:
        lines.append("nothing runs on a GPU in this config (train.device and generate.device are cpu)")
    return "\n".join(lines).rstrip() + "\n"


def refusal(plan: Plan) -> UserError | None:
    """One line for the first part that does not fit, naming the fix."""
    for check in plan.checks:
        if not check.fits:
            why = check.problems[0] if check.problems else (
                f"{check.total_gib:.1f} GiB per GPU needed, {check.capacity_gib:.1f} GiB available")
            return UserError(f"plan: {check.name} does not fit ({check.layout}): {why}; fix: {check.fix} "
                             "(`sa-sft plan` prints the table)")
    return None


def model_shape(cfg: Config) -> ModelShape:
    """The configured model's shape: a built-in is prepared; a folder needs only its config.json."""
    from sa_sft.models import config_folder
    return read_model_shape(config_folder(cfg.model.path))


def longest_sequence(cfg: Config) -> int:
    """The longest context an engine holds: a generated dialogue, or an evaluation prompt and its answer."""
    g = cfg.generate
    return max(g.turns // 2 * (g.max_user_tokens + g.max_assistant_tokens) + 256,
               cfg.evaluate.max_seq_len + cfg.evaluate.max_new_tokens)


def plan_for(cfg: Config) -> Plan:
    return make_plan(cfg, model_shape(cfg), longest_sequence(cfg))
