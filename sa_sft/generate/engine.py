"""A Ray actor holding one vLLM engine; it turns a shard number into that shard's dialogues.

The actor receives only (shard, seeds, sampling settings) and returns raw turns; the
prompts and seeds are pure functions of the run seed and the shard (strategies.py), and
each shard is generated as one fixed batch, so the result does not depend on which
engine ran it.
"""
import os
import time

import ray


def engine_env(cfg, engine_index: int, cpu_ids: list[int], cache_root: str) -> dict:
    """Environment of one engine process: offline, tidy caches, on CPU its own cores."""
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
        env.update({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": f"{cpu_ids[0]}-{cpu_ids[-1]}" if len(cpu_ids) > 1 else str(cpu_ids[0]),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(len(cpu_ids)),
        })
    return env


def engine_kwargs(cfg, model_path: str, trust_remote_code: bool, seed: int) -> dict:
    kwargs = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": cfg.dtype,
        "seed": seed,
        "enforce_eager": cfg.enforce_eager,
        "max_model_len": cfg.max_user_tokens + cfg.max_assistant_tokens + 256,
        "max_num_seqs": cfg.max_num_seqs,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "trust_remote_code": trust_remote_code,
    }
    if cfg.device == "cuda":
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
    return kwargs


@ray.remote(max_restarts=0)
class EngineActor:
    def __init__(self, kwargs: dict):
        from transformers import AutoTokenizer
        from vllm import LLM

        started = time.time()
        self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"], trust_remote_code=kwargs["trust_remote_code"])
        stop = {self.tokenizer.eos_token_id}
        gen_eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.startup_seconds = time.time() - started

    def info(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "startup_seconds": round(self.startup_seconds, 1)}

    def _run(self, turns, sampling: dict) -> list[dict]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": self.tokenizer(t.prompt, add_special_tokens=False)["input_ids"]}
                   for t in turns]
        params = [SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                                 top_k=sampling["top_k"], max_tokens=t.max_tokens, seed=t.seed,
                                 stop_token_ids=self.stop_ids, skip_special_tokens=True)
                  for t in turns]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [{"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
                 "tokens": len(o.outputs[0].token_ids)} for o in outputs]

    def generate_shard(self, shard: int, run_seed: int, shard_size: int, sampling: dict) -> dict:
        """Generate one shard of two-turn self-dialogues; returns raw turns and timing."""
        from sa_sft.generate import strategies

        started = time.time()
        user_turns = strategies.user_turns(self.tokenizer, run_seed, shard, shard_size, sampling["max_user_tokens"])
        users = self._run(user_turns, sampling)
        answer_turns = strategies.assistant_turns(self.tokenizer, run_seed, shard,
                                                  [u["text"].strip() for u in users], sampling["max_assistant_tokens"])
        answers = self._run(answer_turns, sampling)
        dialogues = []
        for i, dialogue_id in enumerate(strategies.dialogue_ids(shard, shard_size)):
            user, answer = users[i], answers[i]
            dialogues.append({
                "id": dialogue_id,
                "messages": [{"role": "user", "content": user["text"].strip()},
                             {"role": "assistant", "content": answer["text"].strip()}],
                "finish_reasons": [user["finish_reason"], answer["finish_reason"]],
                "tokens": [user["tokens"], answer["tokens"]],
                "seeds": [user_turns[i].seed, answer_turns[i].seed],
                "shard": shard,
            })
        return {"shard": shard, "dialogues": dialogues, "seconds": time.time() - started,
                "tokens": sum(sum(d["tokens"]) for d in dialogues)}
