"""Training ranks on a Ray cluster: one actor per rank in a placement group, each running the same
trainer process torchrun or srun would start, with the rendezvous on rank 0's node.

Why actors around a subprocess rather than Ray Train's TorchTrainer: the trainer stays one
program for every launcher (torchrun, deepspeed, srun, Ray), with its own checkpoints and
resume; a rank that dies takes only its process down, and the driver stops the others at once.
"""
import contextlib
import logging
import os
import signal
import subprocess
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sa_sft import signals
from sa_sft.cluster.ports import free_port
from sa_sft.config import Config
from sa_sft.cluster.ray_cluster import node_label
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.train")

PLACEMENT_TIMEOUT_S = 600
STOP_GRACE_S = 120


@ray.remote(max_restarts=0, max_concurrency=2)  # `stop` must run while `run` waits
class RankActor:
    def __init__(self):
        self.proc = None

    def address(self) -> tuple[str, int, str]:
        """This node's address as Ray knows it (the raylet's --node-ip-address, which other nodes reach),
        a free port on it, and the Ray node id."""
        node = ray.get_runtime_context().get_node_id()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), None)
        return ip or ray.util.get_node_ip_address(), free_port(""), node

    def sees(self) -> dict:
        """What the trainer process started here would see of its devices (for --dry-run)."""
        return {"node": node_label(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cpus": sorted(os.sched_getaffinity(0))}

    def run(self, module_args: list[str], env: dict) -> int:
        self.proc = subprocess.Popen([sys.executable, *module_args], env={**os.environ, **env})
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def bundle(cfg: Config) -> dict:
    if cfg.train.device == "cuda":
        return {"GPU": 1, "CPU": cfg.train.threads_per_rank}
    return {"CPU": cfg.train.threads_per_rank}


def actor_options(cfg: Config, pg, rank: int) -> dict:
    """Each rank's actor asks for its bundle's resources itself: an actor that asks for no GPU is given
    none (no CUDA_VISIBLE_DEVICES of its own) even inside a bundle that reserved one, so every rank
    of a node would see all its GPUs and pick the same one."""
    resources = bundle(cfg)
    return {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=rank)}


def rank_env(cfg: Config, rank: int, addresses: list[tuple[str, int, str]]) -> dict:
    """The rendezvous environment of one rank. With GPUs, Ray gives each rank's actor exactly its own
    device, so it is device 0 there (LOCAL_RANK=0); on CPU, LOCAL_RANK counts the ranks on the node."""
    master_addr, master_port, _ = addresses[0]
    node = addresses[rank][2]
    local = 0 if cfg.train.device == "cuda" else sum(1 for a in addresses[:rank] if a[2] == node)
    return {"RANK": str(rank), "WORLD_SIZE": str(len(addresses)), "LOCAL_RANK": str(local),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "SA_SFT_RAY_NODE_ID": node}


@contextlib.contextmanager
def placed_ranks(cfg: Config):
    """One actor per rank in a placement group (PACK: ranks fill a node before the next)."""
    ranks = cfg.train.ranks
    pg = placement_group([bundle(cfg)] * ranks, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise UserError(f"train: Ray could not place {ranks} rank(s) of {bundle(cfg)} within "
                        f"{PLACEMENT_TIMEOUT_S} s; check the cluster's free resources (`ray status`)")
    actors = [RankActor.options(**actor_options(cfg, pg, rank)).remote() for rank in range(ranks)]
    try:
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)


def dry_run_on_ray(cfg: Config, module_args: list[str], env: dict) -> list[dict]:
    """Place every rank as the real run would and report, per rank, its node, the devices it sees, its
    environment and its command; starts no trainer."""
    from sa_sft.cluster.ray_cluster import ray_session

    with ray_session(cfg.cluster.ray_address), placed_ranks(cfg) as actors:
        addresses = ray.get([actor.address.remote() for actor in actors])
        seen = ray.get([actor.sees.remote() for actor in actors])
    return [{"rank": rank, **seen[rank], "env": {**env, **rank_env(cfg, rank, addresses)},
             "command": [sys.executable, *module_args]} for rank in range(len(actors))]


def run_ranks_on_ray(cfg: Config, module_args: list[str], env: dict, follower=None) -> tuple[int, list[str]]:
    """Run every rank to completion; the first rank to fail stops the rest. Returns (exit code, signals seen)."""
    from sa_sft.cluster.ray_cluster import ray_session

    ranks = cfg.train.ranks
    with ray_session(cfg.cluster.ray_address), placed_ranks(cfg) as actors:
        addresses = ray.get([actor.address.remote() for actor in actors])
        seen: list[str] = []

        def stop_all(signum=None, _frame=None):
            if signum is not None:
                seen.append(signals.name(signum))
            for actor in actors:
                actor.stop.remote()

        with signals.handled(stop_all):
            log.info("train: %d rank(s) on Ray nodes %s; rendezvous %s:%d", ranks,
                     ", ".join(node[:8] for _, _, node in addresses), addresses[0][0], addresses[0][1])
            pending = {actor.run.remote(module_args, {**env, **rank_env(cfg, rank, addresses)}): rank
                       for rank, actor in enumerate(actors)}
            code = 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if follower:
                    follower.poll()
                if not ready:
                    continue
                [done] = ready
                rank = pending.pop(done)
                try:
                    rank_code = ray.get(done)
                except ray.exceptions.RayActorError as err:
                    rank_code = 1
                    log.error("train: rank %d's actor died: %s", rank, str(err).splitlines()[0])
                if rank_code and not code:
                    code = rank_code
                    log.error("train: rank %d exited %d; stopping the other ranks", rank, rank_code)
                    stop_all()
                    ray.wait(list(pending), num_returns=len(pending), timeout=STOP_GRACE_S)
            if follower:
                follower.close()
            return code, seen
