"""A pool of vLLM engine actors on Ray: work items (shards, chunks of prompts) go to whichever engine
is idle, a dead engine is replaced and its items re-queued, results stream back as each finishes."""
import contextlib
import logging
import os
from collections import deque
from typing import Callable, Iterable, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sa_sft.config import GenerateConfig
from sa_sft.engines.actor import EngineActor, engine_env, engine_kwargs
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.generate")

READY_TIMEOUT_S = 1800
ENGINE_NAMESPACE = "sa_sft"


class EnginePool:
    def __init__(self, gcfg: GenerateConfig, model_path: str, trust_remote_code: bool, seed: int,
                 own_machine: bool = True, max_model_len: int | None = None):
        """`own_machine`: the Ray instance is this run's alone (a local one), so engines are pinned to
        disjoint cores; on a cluster they are spread over the nodes and the OS schedules their threads."""
        self.gcfg = gcfg
        self.own_machine = own_machine
        self.kwargs = engine_kwargs(gcfg, model_path, trust_remote_code, seed, max_model_len)
        self.placement_groups: list = [None] * gcfg.engines
        self.started = 0
        self.actors = [self._start(i) for i in range(gcfg.engines)]
        self.restarts = 0
        self.info = self._wait_ready(range(gcfg.engines))

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

    def _start(self, index: int):
        gcfg = self.gcfg
        self.started += 1
        # Named so operators (and the fault tests) can find an engine: `ray list actors`, ray.get_actor.
        options = {"name": f"sa_sft_engine_{index}_{self.started}", "namespace": ENGINE_NAMESPACE}
        if gcfg.device == "cpu" and self.own_machine:
            cpu_ids = self._cpu_layout(index)
            options.update(num_cpus=len(cpu_ids), runtime_env={"env_vars": engine_env(gcfg, cpu_ids)})
        elif gcfg.device == "cpu":
            cpus = self._cpus_per_engine_on_cluster()
            options.update(num_cpus=cpus, scheduling_strategy="SPREAD",
                           runtime_env={"env_vars": engine_env(gcfg, threads=cpus)})
        elif gcfg.tensor_parallel_size == 1:
            options.update(num_gpus=1, num_cpus=1, runtime_env={"env_vars": engine_env(gcfg)})
        else:
            # vLLM's Ray executor places its tensor-parallel workers in the placement group it runs in.
            pg = placement_group([{"GPU": 1, "CPU": 1}] * gcfg.tensor_parallel_size, strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
            self.placement_groups[index] = pg
            options.update(num_gpus=0, num_cpus=0, runtime_env={"env_vars": engine_env(gcfg)},
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_capture_child_tasks=True))
        return EngineActor.options(**options).remote(self.kwargs, gcfg.fast_top_p and gcfg.device == "cpu")

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
        if self.placement_groups[index] is not None:
            remove_placement_group(self.placement_groups[index])
        self.actors[index] = self._start(index)
        self._wait_ready([index])

    def map_work(self, items: Iterable, call: Callable, max_restarts: int = 3, depth: int = 2) -> Iterator[dict]:
        """Run `call(actor, item)` (an actor method's remote call) for each item; yield results as they finish.

        Each engine holds up to `depth` items (the next one waits in the actor's queue), so it
        never idles while the driver writes a result. A dead engine is replaced once and every
        item it held is re-queued.
        """
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
        for pg in self.placement_groups:
            if pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
