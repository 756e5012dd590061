"""A pool of vLLM engine actors on Ray: work items (shards, chunks of prompts) go to whichever engine
is idle, a dead engine is replaced and its items re-queued, results stream back as each finishes.

Where each engine runs is decided by `Placement`, which a dry run uses alone: it places probe
actors exactly as the engines would be placed and reports what each would see.
"""
import contextlib
import logging
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sa_sft.cluster.ray_cluster import node_label
from sa_sft.config import GenerateConfig
from sa_sft.engines.actor import EngineActor, engine_env, engine_kwargs
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.generate")

READY_TIMEOUT_S = 1800
ENGINE_NAMESPACE = "sa_sft"


def check_resources(gcfg: GenerateConfig) -> None:
    """Fail at once, not after a placement timeout, when the Ray cluster has too few GPUs in all."""
    if gcfg.device != "cuda":
        return
    needed, have = gcfg.engines * gcfg.tensor_parallel_size, int(ray.cluster_resources().get("GPU", 0))
    if needed > have:
        raise UserError(f"engines: generate.engines x generate.tensor_parallel_size = {needed} GPUs, but the Ray "
                        f"cluster has {have}; lower generate.engines or add nodes")


class Placement:
    """Where each engine runs. `own_machine`: the Ray instance is this run's alone (a local one), so CPU
    engines are pinned to disjoint cores; on a cluster they are spread over the nodes. On GPUs an
    engine of tensor_parallel_size 1 is an actor with one GPU (spread over the nodes); a larger one
    gets a placement group of that many GPUs on one node, where vLLM's Ray executor places its
    workers, the engine actor itself taking none."""

    def __init__(self, gcfg: GenerateConfig, own_machine: bool):
        self.gcfg = gcfg
        self.own_machine = own_machine
        self.placement_groups: list = [None] * gcfg.engines
        check_resources(gcfg)

    def _cpu_layout(self, index: int) -> list[int]:
        cores = os.cpu_count() or 1
        per_engine = self.gcfg.cpus_per_engine or max(1, cores // self.gcfg.engines)
        first = (index * per_engine) % cores
        return [(first + j) % cores for j in range(per_engine)]

    def _cpus_per_engine_on_cluster(self) -> int:
        if self.gcfg.cpus_per_engine:
            return self.gcfg.cpus_per_engine
        per_node = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
        total = sum(per_node)
        return max(1, int(min(max(per_node, default=1), total // self.gcfg.engines)))

    def options(self, index: int) -> dict:
        """The Ray actor options of engine `index` (creating its placement group when it needs one)."""
        gcfg = self.gcfg
        self.release(index)
        if gcfg.device == "cpu" and self.own_machine:
            cpu_ids = self._cpu_layout(index)
            return dict(num_cpus=len(cpu_ids), runtime_env={"env_vars": engine_env(gcfg, cpu_ids)})
        if gcfg.device == "cpu":
            cpus = self._cpus_per_engine_on_cluster()
            return dict(num_cpus=cpus, scheduling_strategy="SPREAD",
                        runtime_env={"env_vars": engine_env(gcfg, threads=cpus)})
        if gcfg.tensor_parallel_size == 1:
            return dict(num_gpus=1, num_cpus=1, scheduling_strategy="SPREAD",
                        runtime_env={"env_vars": engine_env(gcfg)})
        pg = placement_group([{"GPU": 1, "CPU": 1}] * gcfg.tensor_parallel_size, strategy="STRICT_PACK")
        ready, _ = ray.wait([pg.ready()], timeout=READY_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise UserError(f"engines: Ray could not place {gcfg.tensor_parallel_size} GPUs on one node for engine "
                            f"{index} within {READY_TIMEOUT_S} s; generate.tensor_parallel_size must fit in a node")
        self.placement_groups[index] = pg
        return dict(num_gpus=0, num_cpus=0, runtime_env={"env_vars": engine_env(gcfg)},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_capture_child_tasks=True))

    def release(self, index: int) -> None:
        if self.placement_groups[index] is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_groups[index])
            self.placement_groups[index] = None

    def close(self) -> None:
        for index in range(len(self.placement_groups)):
            self.release(index)


@ray.remote(num_cpus=0)
class _WorkerProbe:
    """Where one of vLLM's tensor-parallel workers would run (an actor, as vLLM's Ray executor makes them,
    holding its GPU while the others are placed)."""

    def sees(self) -> dict:
        return {"node": node_label(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@ray.remote(max_restarts=0)
class EngineProbe:
    """Placed exactly as an engine; reports what the engine (and its tensor-parallel workers) would see."""

    def sees(self, tp_workers: int) -> dict:
        seen = {"node": node_label(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_"))}}
        if tp_workers > 1:  # as vLLM's Ray executor: one worker actor per GPU of the engine's placement group
            workers = [_WorkerProbe.options(num_gpus=1, num_cpus=1).remote() for _ in range(tp_workers)]
            try:
                seen["workers"] = ray.get([w.sees.remote() for w in workers])
            finally:
                for worker in workers:
                    ray.kill(worker)
        return seen


def dry_run(gcfg: GenerateConfig, own_machine: bool) -> list[dict]:
    """Place every engine as a real run would, with a probe in its place; starts no vLLM."""
    placement = Placement(gcfg, own_machine)
    probes = []
    try:
        probes = [EngineProbe.options(**placement.options(i)).remote() for i in range(gcfg.engines)]
        return [{"engine": i, **seen} for i, seen in
                enumerate(ray.get([p.sees.remote(gcfg.tensor_parallel_size) for p in probes], timeout=READY_TIMEOUT_S))]
    finally:
        for probe in probes:
            ray.kill(probe)
        placement.close()


def stream_depth(gcfg: GenerateConfig) -> int:
    """Shards held per engine: the next one waits in the actor; streamed, enough to fill vLLM's batch
    (`max_num_seqs`) with one more behind them."""
    if gcfg.schedule != "stream":
        return 2
    # At most 32: each waits in one of the actor's threads (EngineActor's max_concurrency).
    return min(32, 1 + max(1, -(-gcfg.max_num_seqs // gcfg.shard_size)))


class EnginePool:
    def __init__(self, gcfg: GenerateConfig, model_path: str, trust_remote_code: bool, seed: int,
                 own_machine: bool = True, max_model_len: int | None = None, log: Path | None = None):
        self.gcfg = gcfg
        self.log = log  # quiet mode: engine I writes to LOG-engine-I.log beside it
        # Absolute: the engines may run on other nodes, in another working directory.
        model_path = str(Path(model_path).resolve())
        self.kwargs = engine_kwargs(gcfg, model_path, trust_remote_code, seed, max_model_len)
        self.placement = Placement(gcfg, own_machine)
        self.started = 0
        self.actors = [self._start(i) for i in range(gcfg.engines)]
        self.restarts = 0
        self.info = self._wait_ready(range(gcfg.engines))

    def _start(self, index: int):
        self.started += 1
        # Named so operators (and the fault tests) can find an engine: `ray list actors`, ray.get_actor.
        options = {"name": f"sa_sft_engine_{index}_{self.started}", "namespace": ENGINE_NAMESPACE,
                   **self.placement.options(index)}
        log = str(self.log.with_name(f"{self.log.stem}-engine-{index}.log").resolve()) if self.log else None
        return EngineActor.options(**options).remote(self.kwargs, self.gcfg.fast_top_p and self.gcfg.device == "cpu",
                                                     self.gcfg.schedule == "stream", log)

    def _wait_ready(self, indices: Iterable[int]) -> list[dict]:
        refs = [self.actors[i].info.remote() for i in indices]
        try:
            return ray.get(refs, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"generate: vLLM engines not ready after {READY_TIMEOUT_S} s; check the Ray "
                            f"cluster's free resources (generate.engines={self.gcfg.engines}, "
                            f"generate.tensor_parallel_size={self.gcfg.tensor_parallel_size})") from None

    def _replace(self, index: int) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actors[index])
        self.actors[index] = self._start(index)
        self._wait_ready([index])

    def map_work(self, items: Iterable, call: Callable, max_restarts: int = 3, depth: int = 0) -> Iterator[dict]:
        """Run `call(actor, item)` (an actor method's remote call) for each item; yield results as they finish.

        Each engine holds up to `depth` items (0: `stream_depth`), so it never idles while the driver
        writes a result. A dead engine is replaced once and every item it held is re-queued.
        """
        depth = depth or stream_depth(self.gcfg)
        pending = deque(items)
        slots = deque(engine for _ in range(depth) for engine in range(len(self.actors)))
        in_flight: dict = {}
        while pending or in_flight:
            while slots and pending:
                engine, item = slots.popleft(), pending.popleft()
                actor = self.actors[engine]
                in_flight[call(actor, item)] = (engine, item, actor)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            engine, item, actor = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                pending.appendleft(item)
                if actor is not self.actors[engine]:
                    continue  # another item of the same dead engine; it was replaced already
                self.restarts += 1
                if self.restarts > max_restarts:
                    raise UserError(f"generate: engines died {self.restarts} times; last: {err}") from None
                log.warning("engine %d died while working on %s; replacing it and re-queueing its work", engine, item)
                self._replace(engine)
                slots.extend([engine] * depth)
                continue
            slots.append(engine)
            yield result

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.placement.close()
