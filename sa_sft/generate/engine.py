"""A Ray actor holding one vLLM engine; it turns a shard number into that shard's dialogues.

The actor receives only (shard, run seed, sampling settings) and returns raw turns; the
prompts and seeds are pure functions of the run seed and the shard (strategies.py), and
an actor runs one shard at a time with a seed per request, so the result does not depend
on which engine ran it.
"""
import os
import socket
import time

import ray


def node_name() -> str:
    """The Slurm node this process runs on, else the host name (Ray workers inherit the raylet's environment)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_label() -> str:
    """`host/ray-node-id-prefix`: tells apart logical nodes sharing one host (and real ones)."""
    return f"{node_name()}/{ray.get_runtime_context().get_node_id()[:8]}"


def engine_env(cfg, cache_root: str, cpu_ids: list[int] | None = None, threads: int = 0) -> dict:
    """Environment of one engine process: offline, tidy caches; on CPU pinned to `cpu_ids`, or
    `threads` unpinned threads where the node is shared."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": os.path.join(cache_root, "vllm"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if cfg.device == "cpu":
        if cpu_ids:
            bind = f"{cpu_ids[0]}-{cpu_ids[-1]}" if len(cpu_ids) > 1 else str(cpu_ids[0])
            threads = len(cpu_ids)
        else:
            bind = "nobind"
        env.update({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(max(1, threads)),
        })
    return env


def engine_kwargs(cfg, model_path: str, trust_remote_code: bool, seed: int, max_model_len: int | None = None) -> dict:
    kwargs = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": cfg.dtype,
        "seed": seed,
        "enforce_eager": cfg.enforce_eager,
        # The longest prompt is the whole dialogue so far plus the template; a rewrite's prompt holds
        # a task row of unknown length, so it gets the model's own context length.
        "max_model_len": max_model_len or (None if cfg.strategy == "rewrite"
                                           else cfg.turns // 2 * (cfg.max_user_tokens + cfg.max_assistant_tokens) + 256),
        "max_num_seqs": cfg.max_num_seqs,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "trust_remote_code": trust_remote_code,
        "load_format": "safetensors",  # never unpickle weights
    }
    if cfg.device == "cuda":
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
    return kwargs


@ray.remote(max_restarts=0)
class EngineActor:
    def __init__(self, kwargs: dict, fast_top_p: bool = False):
        from transformers import AutoTokenizer
        from vllm import LLM

        from sa_sft.generate.sampling import install_fast_top_p

        started = time.time()
        self.fast_top_p = install_fast_top_p() if fast_top_p else False
        self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"], trust_remote_code=kwargs["trust_remote_code"])
        stop = {self.tokenizer.eos_token_id}
        gen_eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.startup_seconds = time.time() - started

    def info(self) -> dict:
        return {"node": node_label(), "pid": os.getpid(),
                "fast_top_p": self.fast_top_p,
                "startup_seconds": round(self.startup_seconds, 1)}

    def generate_shard(self, shard: int, run_seed: int, shard_size: int, sampling: dict,
                       task_rows: list[dict] | None = None) -> dict:
        """Write one shard: `shard_size` dialogues, or one rewrite per task row for `rewrite`.

        All dialogues of the shard are in flight at once, and each dialogue's next request is
        queued the moment its previous one finishes, so the engine's batch stays full
        (continuous batching) instead of draining at every turn boundary. Every request
        carries its own seed.
        """
        from vllm import SamplingParams

        from sa_sft.generate import strategies

        started = time.time()
        engine = self.llm.llm_engine
        strategy = sampling["strategy"]
        states = ([strategies.new_state(shard, i, row) for i, row in enumerate(task_rows)] if task_rows is not None
                  else [strategies.new_state(shard, i) for i in range(shard_size)])
        in_flight: dict[str, tuple[int, strategies.Turn]] = {}

        def submit(index: int) -> None:
            turn = strategies.next_turn(strategy, self.tokenizer, run_seed, states[index], sampling)
            if turn is None:
                return
            params = SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                                    top_k=sampling["top_k"], max_tokens=turn.max_tokens, seed=turn.seed,
                                    stop_token_ids=self.stop_ids, skip_special_tokens=True)
            prompt = {"prompt_token_ids": self.tokenizer(turn.prompt, add_special_tokens=False)["input_ids"]}
            request_id = f"{states[index]['id']}-{len(states[index]['seeds'])}"
            engine.add_request(request_id, prompt, params)
            in_flight[request_id] = (index, turn)

        for index in range(len(states)):
            submit(index)
        tokens = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                index, turn = in_flight.pop(output.request_id)
                completion = output.outputs[0]
                strategies.apply_completion(states[index], turn, completion.text, completion.finish_reason,
                                            len(completion.token_ids))
                tokens += len(completion.token_ids)
                submit(index)
        return {"shard": shard, "node": node_label(), "dialogues": [strategies.finish_state(s) for s in states],
                "seconds": time.time() - started, "tokens": tokens}

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str], tag=None) -> dict:
        """Greedy completions of raw prompt texts (evaluation), in order; `tag` comes back with them.
        A prompt too long to leave room for `max_tokens` keeps its end."""
        from vllm import SamplingParams

        started = time.time()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop or None,
                                stop_token_ids=self.stop_ids, skip_special_tokens=True)
        room = self.llm.llm_engine.model_config.max_model_len - max_tokens
        token_ids = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"][-room:]}
                     for p in prompts]
        outputs = self.llm.generate(token_ids, params, use_tqdm=False)
        return {"tag": tag, "texts": [o.outputs[0].text for o in outputs], "node": node_label(),
                "tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "seconds": time.time() - started}
