"""What runs on each node of a Slurm job, one srun task per node.

    probe   report this node's view: run directory visible, Python environment, ports free
    raylet  run this node's Ray head or worker (`ray start --block`) until signalled, then clean up
    busy    list processes of this job still alive on the node, and GPUs still holding memory
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from sa_sft import signals
from sa_sft.cluster.ports import JobPorts, port_in_use
from sa_sft.hardware import node_name, versions
from sa_sft.rundir import RunDir

# Command-line fragments of what a Ray node leaves behind if it does not stop cleanly.
RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker.py", "ray/dashboard", "log_monitor.py",
                       "ray start", "sa_sft.cluster.node raylet")


def node_index(nodes: list[str]) -> int:
    name = node_name()
    return nodes.index(name) if name in nodes else int(os.environ.get("SLURM_NODEID", "0"))


def probe(args) -> None:
    nodes = args.nodes.split(",")
    index = node_index(nodes)
    token_file = RunDir(args.run_dir).slurm_probe
    try:
        visible = token_file.read_text().strip() == args.token
    except OSError:
        visible = False
    ports = JobPorts(args.port_base).on_node(index)
    print(json.dumps({"node": nodes[index], "index": index, "host": socket.gethostname(),
                      "python": sys.executable, "versions": versions(), "run_dir_visible": visible,
                      "ports_in_use": [p for p in ports if port_in_use(p)]}), flush=True)


def visible_gpus() -> list[str]:
    """The GPUs Slurm gave this step (its CUDA_VISIBLE_DEVICES): what the raylet declares to Ray, rather
    than what Ray would detect of the whole node."""
    return [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def ray_temp_dir(job_id: str, index: int) -> Path:
    # Short on purpose: Ray's unix sockets live under it (108-byte path limit).
    return Path(tempfile.gettempdir()) / f"sa_sft_ray_{job_id}_{index}"


def raylet(args) -> int:
    nodes = args.nodes.split(",")
    addresses = json.loads(args.addresses)
    index = node_index(nodes)
    ports = JobPorts(args.port_base)
    node_ports = ports.node(index)
    temp_dir = ray_temp_dir(os.environ.get("SLURM_JOB_ID", "0"), index)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
           f"--node-ip-address={addresses[nodes[index]]}", f"--temp-dir={temp_dir}",
           f"--num-cpus={args.num_cpus}", f"--num-gpus={len(visible_gpus())}",
           f"--object-store-memory={int(args.object_store_gib * 1024**3)}",
           f"--node-manager-port={node_ports['node_manager']}", f"--object-manager-port={node_ports['object_manager']}",
           f"--dashboard-agent-grpc-port={node_ports['dashboard_agent_grpc']}",
           f"--dashboard-agent-listen-port={node_ports['dashboard_agent_listen']}",
           f"--metrics-export-port={node_ports['metrics_export']}",
           f"--runtime-env-agent-port={node_ports['runtime_env_agent']}",
           f"--min-worker-port={node_ports['min_worker']}", f"--max-worker-port={node_ports['max_worker']}"]
    if index == 0:
        cmd += ["--head", f"--port={ports.gcs}", f"--ray-client-server-port={ports.ray_client}",
                "--include-dashboard=false"]
    else:
        cmd += [f"--address={addresses[nodes[0]]}:{ports.gcs}"]
    print(f"[{nodes[index]}] {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd)
    # srun forwards SIGTERM/SIGINT here; `ray start --block` drains and stops the node's processes on SIGTERM.
    signals.install(lambda signum, _frame: proc.send_signal(signal.SIGTERM), (signal.SIGTERM, signal.SIGINT))
    code = proc.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0 if code in (0, -signal.SIGTERM) else code


def busy(args) -> None:
    """Processes of this Slurm job other than this probe and its srun parents, and GPU memory in use."""
    import psutil

    job_id = os.environ.get("SLURM_JOB_ID")
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    leftovers = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.pid in mine or proc.environ().get("SLURM_JOB_ID") != job_id:
                continue
            # The program and its first arguments only: a path elsewhere on the command line (an output
            # directory named after raylets, say) does not make a process a Ray process.
            cmdline = " ".join((proc.info["cmdline"] or [])[:4])
            if any(word in cmdline for word in RAY_PROCESS_MARKERS):
                leftovers.append(f"{proc.pid}:{proc.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout
        gpus = [line.strip() for line in out.splitlines() if line.strip()]
    nodes = args.nodes.split(",")
    print(json.dumps({"node": nodes[node_index(nodes)], "processes": leftovers, "gpu_apps": gpus}), flush=True)


def whoami(args) -> None:
    """What this task of an srun step sees: its Slurm ids, the rendezvous environment the trainer would
    build from them, its GPUs and the CPUs it may run on (for --dry-run)."""
    from sa_sft.cluster.slurm import device_of, rank_env_from_slurm

    env = {**os.environ, **rank_env_from_slurm(os.environ)}
    report = {"node": node_name(), "host": socket.gethostname(), "role": args.role,
              "SLURM_PROCID": os.environ.get("SLURM_PROCID"), "SLURM_LOCALID": os.environ.get("SLURM_LOCALID"),
              "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "SLURM_GPUS_ON_NODE": os.environ.get("SLURM_GPUS_ON_NODE"),
              "cpus": sorted(os.sched_getaffinity(0)),
              "env": {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in env}}
    if "LOCAL_RANK" in env:
        report["gpu"] = device_of(int(env["LOCAL_RANK"]), os.environ.get("CUDA_VISIBLE_DEVICES"))
    print(json.dumps(report), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m sa_sft.cluster.node")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--port-base", type=int, required=True)
    p = sub.add_parser("raylet")
    p.add_argument("--nodes", required=True)
    p.add_argument("--addresses", required=True, help="JSON map node -> IP")
    p.add_argument("--port-base", type=int, required=True)
    p.add_argument("--num-cpus", type=int, required=True)
    p.add_argument("--object-store-gib", type=float, required=True)
    p = sub.add_parser("busy")
    p.add_argument("--nodes", required=True)
    p = sub.add_parser("whoami")
    p.add_argument("--role", default="task")
    args = parser.parse_args()
    if args.command == "probe":
        probe(args)
    elif args.command == "raylet":
        return raylet(args)
    elif args.command == "whoami":
        whoami(args)
    else:
        busy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
