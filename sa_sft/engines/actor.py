"""A Ray actor holding one vLLM engine. It runs request programs (generation) and greedy
completions (evaluation); what the requests are is the caller's business.

A program is a picklable object that says, for each of its items, which request comes next
given what was written so far (see `run_program`). The generate stage's programs make every
prompt and seed a pure function of (run seed, shard, item, step), and the actor runs one
program at a time with a seed per request, so the result does not depend on which engine
ran it.
"""
import collections
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from sa_sft.cache import vllm_cache_dir
from sa_sft.config import GenerateConfig
from sa_sft.console import redirect
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
    if gcfg.schedule == "stream":
        kwargs["scheduling_policy"] = "priority"  # earlier shards first: each finishes (and is written) soon
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


class _Job:
    """A program sent to an engine, while it runs."""
    numbers = itertools.count()

    def __init__(self, program):
        self.program = program
        self.priority = getattr(program, "priority", 0)
        self.number = next(self.numbers)
        self.states: list = []
        self.open = 0  # requests in the engine
        self.tokens = 0
        self.peak = 0  # most requests the engine held at once while this program ran
        self.started = time.time()
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None


# Threaded: programs wait in their callers' threads while one loop thread steps the engine for all of them.
@ray.remote(max_restarts=0, max_concurrency=64)
class EngineActor:
    def __init__(self, kwargs: dict, fast_top_p: bool = False, stream: bool = False, log_path: str | None = None):
        if log_path:  # quiet mode: everything this engine's process prints goes to the run's logs
            redirect(Path(log_path))
        # The prepared default model is float32 (its exact dequantisation); an engine running bfloat16
        # casts it at load on purpose, which vLLM reports once per tensor.
        logging.getLogger("vllm.model_executor.models.utils").addFilter(
            lambda record: "Attempted to load weight" not in str(record.msg))
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
        self.stream = stream
        self.lock = threading.Lock()  # one caller of the engine at a time
        self.wake = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.loop: threading.Thread | None = None

    def info(self) -> dict:
        return {"node": node_label(), "pid": os.getpid(),
                "fast_top_p": self.fast_top_p,
                "startup_seconds": round(self.startup_seconds, 1)}

    def run_program(self, program) -> dict:
        """Run every item of `program` to completion; returns `program.result(states)` with the node,
        the seconds and the tokens generated.

        `program` provides `start() -> states` (one per item, all in flight at once),
        `next_request(tokenizer, state) -> Request | None` (None: the item is done),
        `on_completion(state, request, text, finish_reason, num_tokens)` and a `priority` (lower runs
        first). Each item's next request is queued the moment its previous one finishes, so the batch
        stays full within a program. With `stream`, programs sent while others run join the same
        batch at once (the engine never drains at a program's tail); without it a program runs alone,
        which keeps its samples independent of what else the engine was given (vLLM's numerics
        depend on the batch it runs in).
        """
        job = _Job(program)
        with self.wake:
            self.queue.append(job)
            self.wake.notify_all()
            if self.loop is None:
                self.loop = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
                self.loop.start()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        """The one thread that steps the engine for programs (vLLM's engine is not thread-safe)."""
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        active: dict[int, _Job] = {}
        in_flight: dict[str, tuple[_Job, int, Request]] = {}

        def submit(job: _Job, index: int) -> None:
            request = job.program.next_request(self.tokenizer, job.states[index])
            if request is None:
                return
            params = SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                    max_tokens=request.max_tokens, seed=request.seed,
                                    stop_token_ids=self.stop_ids, skip_special_tokens=True)
            prompt = {"prompt_token_ids": self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]}
            request_id = f"{job.number}:{request.id}"
            engine.add_request(request_id, prompt, params, **({"priority": job.priority} if self.stream else {}))
            in_flight[request_id] = (job, index, request)
            job.open += 1

        def finish(job: _Job) -> None:
            active.pop(job.number)
            job.result = {**job.program.result(job.states), "node": node_label(),
                          "seconds": time.time() - job.started, "tokens": job.tokens, "in_flight_peak": job.peak}
            job.done.set()

        while True:
            with self.wake:
                while not self.queue and not active:
                    self.wake.wait()
                admit = []
                while self.queue and (self.stream or not (active or admit)):
                    admit.append(self.queue.popleft())
            try:
                with self.lock:
                    for job in admit:
                        active[job.number] = job
                        job.started, job.states = time.time(), job.program.start()
                        for index in range(len(job.states)):
                            submit(job, index)
                        if not job.open:
                            finish(job)
                    for job in active.values():
                        job.peak = max(job.peak, len(in_flight))
                    outputs = engine.step() if engine.has_unfinished_requests() else []
                    for output in outputs:
                        if not output.finished:
                            continue
                        job, index, request = in_flight.pop(output.request_id)
                        completion = output.outputs[0]
                        job.program.on_completion(job.states[index], request, completion.text,
                                                  completion.finish_reason, len(completion.token_ids))
                        job.tokens += len(completion.token_ids)
                        job.open -= 1
                        submit(job, index)
                        if not job.open:
                            finish(job)
            except BaseException as err:  # the engine is unusable: fail every program it held or was sent
                with self.wake:
                    failed = list(active.values()) + list(self.queue)
                    self.queue.clear()
                for job in failed:
                    job.error = err
                    job.done.set()
                active.clear()
                self.loop = None
                return

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
        with self.lock:
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
        with self.lock:
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
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[step[token].logprob for step, token in zip(o.outputs[0].logprobs, ids)]
                    for o, ids in zip(outputs, tokens)]
        return {"tag": tag, "tokens": tokens, "logprobs": logprobs, "node": node_label(),
                "seconds": time.time() - started}
