"""`lm_eval:TASK` suites: EleutherAI's lm-evaluation-harness, through its Python API, on the base and
the fine-tuned model. Its numbers are kept as it reports them (the task's first metric and its
standard error, so they compare with published ones run the same way: same few-shot count, chat
template or not, no item limit), and its per-item results give the paired changes the report
and `sa-sft compare` show for every other suite.

Back end: its vLLM one on GPUs (in a Ray task holding the engines' devices, started after our
engines are gone), its Hugging Face one on CPU. Offline, tasks come from the harness's own
YAML index plus `evaluate.lm_eval_include_path` (folders of task YAMLs, as `lm_eval
--include_path`); their data must be local or in the `datasets` cache.
"""
import difflib
import functools
import hashlib
import importlib.metadata
import logging
from pathlib import Path

from sa_sft.config import Config
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.evaluate")

PREFIX = "lm_eval:"


def is_harness(spec: str) -> bool:
    return spec.startswith(PREFIX)


def harness_specs(specs: list[str]) -> list[str]:
    return [s for s in specs if is_harness(s)]


@functools.cache
def task_manager(include_path: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None, verbosity="ERROR")


def check_tasks(cfg: Config) -> None:
    """Every `lm_eval:TASK` names a task or group the harness knows; before any stage runs."""
    names = [s.removeprefix(PREFIX) for s in harness_specs(cfg.evaluate.suites)]
    if not names:
        return
    include = cfg.evaluate.lm_eval_include_path
    if include and not Path(include).is_dir():
        raise UserError(f"config key evaluate.lm_eval_include_path: {include} is not a directory")
    known = set(task_manager(include).all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise UserError(f"evaluate.suites: lm_eval:{name} is not a task or group lm-eval knows"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + "; add folders of task YAMLs with evaluate.lm_eval_include_path")


def fingerprint(cfg: Config) -> dict:
    """What the harness's scores depend on beyond the config: its version and the custom task files
    (nothing without lm_eval suites, so other runs' fingerprints stay as they were)."""
    if not harness_specs(cfg.evaluate.suites):
        return {}
    h = hashlib.sha256(importlib.metadata.version("lm_eval").encode())
    include = cfg.evaluate.lm_eval_include_path
    if include:
        for path in sorted(p for p in Path(include).rglob("*") if p.is_file()):
            h.update(str(path.relative_to(include)).encode())
            h.update(path.read_bytes())
    return {"lm_eval": h.hexdigest()}


def backend(cfg: Config) -> str:
    chosen = cfg.evaluate.lm_eval_backend
    return chosen if chosen != "auto" else ("vllm" if cfg.generate.device == "cuda" else "hf")


def model_args(cfg: Config, model_path: Path) -> dict:
    # The engines' dtype (`generate.dtype`, resolved per machine at load).
    common = {"pretrained": str(model_path), "dtype": cfg.generate.dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if backend(cfg) == "vllm":
        return {**common, "tensor_parallel_size": cfg.generate.tensor_parallel_size, "seed": cfg.seed,
                "gpu_memory_utilization": cfg.generate.gpu_memory_utilization,
                "max_model_len": cfg.evaluate.max_seq_len + cfg.evaluate.max_new_tokens}
    return common


def score_tasks(cfg: Config, model_path: Path, specs: list[str]) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` over `specs` for one model, in this process; our scores by spec."""
    from lm_eval import simple_evaluate

    ecfg = cfg.evaluate
    tasks = [s.removeprefix(PREFIX) for s in specs]
    out = simple_evaluate(
        model=backend(cfg), model_args=model_args(cfg, model_path), tasks=tasks,
        num_fewshot=None if ecfg.lm_eval_num_fewshot < 0 else ecfg.lm_eval_num_fewshot,
        batch_size=ecfg.lm_eval_batch_size, device="cuda" if cfg.generate.device == "cuda" else "cpu",
        limit=ecfg.max_items or None, log_samples=True, task_manager=task_manager(ecfg.lm_eval_include_path),
        apply_chat_template=ecfg.lm_eval_chat_template, bootstrap_iters=1000,
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    return {spec: suite_result(out, task, backend(cfg)) for spec, task in zip(specs, tasks)}


def leaves(out: dict, name: str) -> list[str]:
    """The tasks that hold samples under `name` (itself, or a group's subtasks, recursively)."""
    groups = {group if isinstance(group, str) else group.group: subtasks
              for group, subtasks in out.get("group_subtasks", {}).items()}
    if name in out.get("samples", {}) or not groups.get(name):
        return [name]
    return [leaf for sub in groups[name] for leaf in leaves(out, sub)]


def suite_result(out: dict, name: str, backend_name: str) -> dict:
    """One task's (or group's) entry in our scores: the first metric as `value`, a normal interval
    from the harness's standard error, every metric it reported, and per-item values when numeric."""
    reported = out["results"][name]
    key = next(k for k in reported if "," in k and "_stderr" not in k)
    metric, _, filter_name = key.partition(",")
    if not out.get("higher_is_better", {}).get(name, {}).get(metric, True):
        raise UserError(f"evaluate.suites: lm_eval:{name} reports {metric}, where lower is better; sa-sft "
                        "compares accuracy-type metrics only")
    value = float(reported[key])
    stderr = reported.get(f"{metric}_stderr,{filter_name}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) else None
    per_item = []
    for leaf in leaves(out, name):
        rows = sorted((s for s in out.get("samples", {}).get(leaf, []) if s.get("filter", "none") == filter_name),
                      key=lambda s: s["doc_id"])
        per_item += [s.get(metric) for s in rows]
    numeric = per_item and all(isinstance(v, (int, float)) for v in per_item)
    ci95 = None
    if stderr is not None:
        ci95 = [value - 1.96 * stderr, value + 1.96 * stderr]
        if numeric and all(0 <= v <= 1 for v in per_item):  # a share: the interval stays within [0, 1]
            ci95 = [max(0.0, ci95[0]), min(1.0, ci95[1])]
        ci95 = [round(c, 4) for c in ci95]
    return {
        "metric": "accuracy", "value": round(value, 4), "ci95": ci95,
        "stderr": stderr, "n": len(per_item) or None,
        **({"per_item": [float(v) for v in per_item]} if numeric else {}),
        "lm_eval": {"task": name, "metric": key, "backend": backend_name,
                    "metrics": {k: v for k, v in reported.items() if isinstance(v, (int, float))},
                    "n_shot": out.get("n-shot", {}).get(name), "version": out.get("versions", {}).get(name),
                    "lm_eval": importlib.metadata.version("lm_eval")},
    }


def evaluate_model(cfg: Config, model_path: Path, specs: list[str]) -> dict[str, dict]:
    """Scores of `specs` (lm_eval:TASK) for one model, keyed by spec."""
    if backend(cfg) != "vllm" or cfg.generate.device != "cuda":
        return score_tasks(cfg, model_path, specs)
    import ray

    from sa_sft.cluster.ray_cluster import ray_session

    # One engine's devices, in a process of its own, once our engines are gone.
    with ray_session(cfg.cluster.ray_address):
        task = ray.remote(num_gpus=cfg.generate.tensor_parallel_size)(score_tasks)
        return ray.get(task.remote(cfg, model_path, specs))
