"""Training ranks on a Ray cluster: one actor per rank in a placement group, each running the same
trainer process torchrun or srun would start, with the rendezvous on rank 0's node.

Why actors around a subprocess rather than Ray Train's TorchTrainer: the trainer stays one
program for every launcher (torchrun, deepspeed, srun, Ray), with its own checkpoints and
resume; a rank that dies takes only its process down, and the driver stops the others at once.
"""
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
from sa_sft.errors import UserError

log = logging.getLogger("sa_sft.train")

PLACEMENT_TIMEOUT_S = 600
STOP_GRACE_S = 120


@ray.remote(max_restarts=0, max_concurrency=2)  # `stop` must run while `run` waits
class RankActor:
    def __init__(self):
        self.proc = None

    def address(self) -> tuple[str, int, str]:
        """This node's IP, a free port on it, and the Ray node id."""
        return ray.util.get_node_ip_address(), free_port(""), ray.get_runtime_context().get_node_id()

    def run(self, module_args: list[str], env: dict) -> int:
        self.proc = subprocess.Popen([sys.executable, *module_args], env={**os.environ, **env})
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def bundle(cfg: Config) -> dict:
    if cfg.train.device == "cuda":
        return {"GPU": 1, "CPU": 1}
    return {"CPU": cfg.train.threads_per_rank}


def run_ranks_on_ray(cfg: Config, module_args: list[str], env: dict) -> tuple[int, list[str]]:
    """Run every rank to completion; the first rank to fail stops the rest. Returns (exit code, signals seen)."""
    from sa_sft.cluster.ray_cluster import ray_session

    ranks = cfg.train.ranks
    with ray_session(cfg.cluster.ray_address):
        pg = placement_group([bundle(cfg)] * ranks, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise UserError(f"train: Ray could not place {ranks} rank(s) of {bundle(cfg)} within "
                            f"{PLACEMENT_TIMEOUT_S} s; check the cluster's free resources (`ray status`)")
        actors = [RankActor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank)).remote() for rank in range(ranks)]
        addresses = ray.get([actor.address.remote() for actor in actors])
        master_addr, master_port, _ = addresses[0]
        seen: list[str] = []

        def stop_all(signum=None, _frame=None):
            if signum is not None:
                seen.append(signals.name(signum))
            for actor in actors:
                actor.stop.remote()

        previous = signals.install(stop_all)
        try:
            log.info("train: %d rank(s) on Ray nodes %s; rendezvous %s:%d", ranks,
                     ", ".join(node[:8] for _, _, node in addresses), master_addr, master_port)
            pending = {}
            for rank, actor in enumerate(actors):
                rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": master_addr,
                            "MASTER_PORT": str(master_port), "SA_SFT_RAY_NODE_ID": addresses[rank][2],
                            # Ray gives each GPU actor one visible device, so it is device 0 there.
                            "LOCAL_RANK": "0" if cfg.train.device == "cuda" else
                            str(sum(1 for a in addresses[:rank] if a[2] == addresses[rank][2]))}
                pending[actor.run.remote(module_args, rank_env)] = rank
            code = 0
            while pending:
                [done], _ = ray.wait(list(pending), num_returns=1)
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
            return code, seen
        finally:
            signals.restore(previous)
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(pg)
