"""Ray for one stage: join a cluster, start a local instance, or bring one up over a Slurm allocation."""
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sa_sft.cluster.ports import job_ports
from sa_sft.console import verbose
from sa_sft.cluster.slurm import Allocation, srun_command
from sa_sft.config import ClusterConfig
from sa_sft.errors import UserError
from sa_sft.hardware import node_name
from sa_sft.rundir import RunDir

log = logging.getLogger("sa_sft.cluster")

STOP_TIMEOUT_S = 120
_owned_instance = False


@contextlib.contextmanager
def ray_session(address: str):
    """Join `address` (else $RAY_ADDRESS, which `ray job submit` sets), or start a local Ray for the
    duration and stop it after. Yields True when the instance is this process's own, so the caller
    may pin engines to cores; on a shared cluster it may not."""
    import ray

    global _owned_instance
    if ray.is_initialized():
        yield _owned_instance
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        try:
            ray.init(address=address, log_to_driver=verbose())
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {address} (cluster.ray_address / RAY_ADDRESS): "
                            f"{str(err).splitlines()[0]}") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=verbose(),
                 runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "1"}})
    _owned_instance = not address
    try:
        yield _owned_instance
    finally:
        ray.shutdown()
        _owned_instance = False


def node_label() -> str:
    """`host/ray-node-id-prefix` of the Ray worker calling it: tells apart logical nodes sharing one host."""
    import ray
    return f"{node_name()}/{ray.get_runtime_context().get_node_id()[:8]}"


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def wait_for_port(host: str, port: int, deadline: float, proc: subprocess.Popen, log_path: Path) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"ray: the head node's `ray start` exited ({proc.returncode}) before its GCS came up; "
                            f"{log_path}: {log_tail(log_path)}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise UserError(f"ray: the head's GCS at {host}:{port} did not come up in time; see {log_path}")


def wait_for_nodes(expected: int, deadline: float, procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Poll the cluster until `expected` nodes are alive, failing as soon as a node's step dies."""
    import ray

    alive = 0
    while time.time() < deadline:
        for name, (proc, log_path) in procs.items():
            if proc.poll() is not None:
                raise UserError(f"ray: the {name} srun step exited ({proc.returncode}) while nodes were joining; "
                                f"{log_path}: {log_tail(log_path)}")
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= expected:
            return
        time.sleep(1.0)
    raise UserError(f"ray: only {alive} of {expected} nodes joined within cluster.join_timeout_s; "
                    f"see {', '.join(str(p) for _, p in procs.values())}")


def check_nodes_free(alloc: Allocation, deadline: float) -> None:
    """After Ray stopped: no Ray process of this job left on any node, no GPU memory held."""
    cmd = srun_command(alloc.nodes) + [sys.executable, "-m", "sa_sft.cluster.node", "busy",
                                       "--nodes", ",".join(alloc.nodes)]
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        busy = [r for r in reports if r["processes"] or r["gpu_apps"]]
        if len(reports) == len(alloc.nodes) and not busy:
            return
        if time.time() > deadline:
            what = "; ".join(f"{r['node']}: {r['processes'] + r['gpu_apps']}" for r in busy) or "no node answered"
            raise UserError(f"ray: nodes still busy after Ray stopped ({what}); the next stage would share them")
        time.sleep(2.0)


def raylet_srun(alloc: Allocation, nodes: list[str]) -> list[str]:
    """The srun step of the raylets on `nodes`: one task per node holding all its CPUs (and GPUs)."""
    return srun_command(nodes, cpus_per_task=alloc.cpus_per_node, extra=("--label",))


_job_token: str | None = None


def job_token() -> str:
    """One fresh token per process (a Slurm job's driver), whatever number of Ray clusters it starts."""
    global _job_token
    if _job_token is None:
        _job_token = secrets.token_hex(32)
    return _job_token


@contextlib.contextmanager
def ray_on_slurm(alloc: Allocation, ccfg: ClusterConfig, run: RunDir):
    """A Ray cluster over the allocation for the duration: the head on the first node, a worker on every
    other (each an `srun --overlap` step running `ray start --block`), joined before this yields and
    stopped, with every node checked free, after."""
    # Token authentication: only processes given this job's token join; it travels in the
    # environment (srun passes it on), never in a file. Ray reads it when first imported, so every
    # Ray cluster of one job (generation's, then evaluation's) uses the same token.
    token_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": job_token()}
    saved_env = {k: os.environ.get(k) for k in token_env}
    os.environ.update(token_env)
    import ray

    ports = job_ports(alloc.job_id, ccfg.port_base)
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(name: str, nodes: list[str]) -> None:
        log_path = run.ray_log(name, alloc.job_id)
        # Since Slurm 22.05 a step does not inherit the job's cpus-per-task: without it a raylet bound by
        # task/affinity or cgroups gets one CPU while it advertises the node's.
        cmd = raylet_srun(alloc, nodes) + [
            sys.executable, "-m", "sa_sft.cluster.node", "raylet", "--nodes", ",".join(alloc.nodes),
            "--addresses", json.dumps(alloc.addresses), "--port-base", str(ports.base),
            "--num-cpus", str(alloc.cpus_per_node), "--object-store-gib", str(ccfg.ray_object_store_gib)]
        with open(log_path, "ab") as out:
            procs[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log_path)

    started = time.time()
    deadline = started + ccfg.join_timeout_s
    address = f"{alloc.head_address}:{ports.gcs}"
    failed = False
    try:
        start("head", [alloc.head])
        wait_for_port(alloc.head_address, ports.gcs, deadline, *procs["head"])
        if len(alloc.nodes) > 1:
            start("workers", alloc.nodes[1:])
        ray.init(address=address, log_to_driver=verbose())
        wait_for_nodes(len(alloc.nodes), deadline, procs)
        log.info("ray: %d node(s) joined at %s in %.0f s (%s); logs in %s", len(alloc.nodes), address,
                 time.time() - started, ", ".join(alloc.nodes), run.logs_dir)
        yield address
    except BaseException:
        failed = True
        raise
    finally:
        ray.shutdown()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # srun forwards it to `ray start --block`, which drains
        stop_deadline = time.time() + STOP_TIMEOUT_S
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=max(1.0, stop_deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not failed:
            check_nodes_free(alloc, time.time() + 60)
            log.info("ray: stopped on every node; nodes free")
