"""The Slurm allocation a job runs in: its nodes and their addresses, srun commands, node probes;
and the sbatch scripts that submit such jobs (package data in sa_sft/slurm/, `sa-sft slurm-scripts DIR`).

Everything here reads the allocation from Slurm itself (`SLURM_*`, `scontrol`), never by
parsing node lists by hand, and fails with one line naming what is wrong.
"""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from sa_sft.cluster.ports import SLOT_WIDTH, JobPorts
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_bytes

@dataclasses.dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: list[str]            # the first is the head: Ray's GCS and rank 0 live there
    addresses: dict[str, str]   # node name -> IP address other nodes reach it at
    cpus_per_node: int
    restart_count: int

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def head_address(self) -> str:
        return self.addresses[self.head]


def scontrol(*args: str) -> str:
    if shutil.which("scontrol") is None:
        raise UserError("scontrol is not on PATH; run this inside a Slurm job on a node with the Slurm client")
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"scontrol {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def node_addresses(nodes: list[str]) -> dict[str, str]:
    """Each node's NodeAddr from slurmctld, resolved to an IP (what Slurm itself uses to reach it)."""
    addresses = {}
    for line in scontrol("show", "node", "-o", ",".join(nodes)).splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "NodeName" in fields:
            addresses[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    resolved = {}
    for node in nodes:
        if node not in addresses:
            raise UserError(f"slurm: scontrol knows no node {node!r} of SLURM_JOB_NODELIST")
        try:
            resolved[node] = socket.gethostbyname(addresses[node])
        except OSError:
            raise UserError(f"slurm: node {node}'s address {addresses[node]!r} does not resolve on "
                            f"{socket.gethostname()}") from None
    return resolved


def current_allocation() -> Allocation:
    env = os.environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise UserError("not inside a Slurm job (SLURM_JOB_ID is unset); submit with `sbatch slurm/sa_sft.sbatch CONFIG` "
                        "(`sa-sft slurm-scripts slurm` writes the scripts there)")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError(f"slurm job {job_id}: SLURM_JOB_NODELIST is unset")
    nodes = scontrol("show", "hostnames", nodelist).split()
    expected = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(nodes))
    if not nodes or len(nodes) != expected:
        raise UserError(f"slurm job {job_id}: node list {nodelist!r} expands to {len(nodes)} node(s), "
                        f"but SLURM_JOB_NUM_NODES={expected}")
    # SLURM_JOB_CPUS_PER_NODE looks like "4(x2),2"; the first node's count is what srun steps there get.
    cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE", "1").split("(")[0].split(",")[0]
    return Allocation(job_id=job_id, nodes=nodes, addresses=node_addresses(nodes), cpus_per_node=int(cpus),
                      restart_count=int(env.get("SLURM_RESTART_COUNT", "0")))


def srun_command(nodes: list[str], tasks_per_node: int = 1, overlap: bool = True,
                 cpus_per_task: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """An srun step over exactly `nodes`, `tasks_per_node` tasks on each; one task failing ends the step."""
    cmd = ["srun", f"--nodes={len(nodes)}", f"--ntasks={len(nodes) * tasks_per_node}",
           f"--ntasks-per-node={tasks_per_node}", f"--nodelist={','.join(nodes)}", "--kill-on-bad-exit=1"]
    if overlap:
        cmd.append("--overlap")  # helper steps share the CPUs the main work runs on
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    if os.environ.get("SLURM_GPUS_ON_NODE"):
        # Steps see only the GPUs they ask for; every task gets the node's GPUs, LOCAL_RANK picks one.
        cmd.append(f"--gpus-per-node={os.environ['SLURM_GPUS_ON_NODE']}")
    return cmd + list(extra)


def probe_nodes(alloc: Allocation, run_dir: str, token: str, ports: JobPorts) -> list[dict]:
    """Run the node probe once on every node and return what each reported."""
    cmd = srun_command(alloc.nodes) + [sys.executable, "-m", "sa_sft.cluster.node", "probe",
                                       "--run-dir", run_dir, "--token", token,
                                       "--nodes", ",".join(alloc.nodes), "--port-base", str(ports.base)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    reports = []
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            reports.append(json.loads(line))
    if result.returncode != 0 or len(reports) != len(alloc.nodes):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"slurm: the node probe ran on {len(reports)} of {len(alloc.nodes)} node(s) "
                        f"(srun exit {result.returncode}): {tail}")
    return reports


def check_probes(reports: list[dict], run_dir: str) -> None:
    """Shared run directory, one Python environment, free ports: else one line naming the node."""
    by_node = sorted(reports, key=lambda r: r["index"])
    first = by_node[0]
    for report in by_node:
        node = report["node"]
        if not report["run_dir_visible"]:
            raise UserError(f"slurm: the run directory {run_dir} is not visible from node {node} "
                            f"(output_dir must be on a filesystem shared by every node)")
        if report["python"] != first["python"]:
            raise UserError(f"slurm: node {node} runs Python {report['python']}, node {first['node']} runs "
                            f"{first['python']}; use the same environment on every node")
        for package, version in report["versions"].items():
            if version != first["versions"].get(package):
                raise UserError(f"slurm: node {node} has {package} {version}, node {first['node']} has "
                                f"{first['versions'].get(package)}; use the same environment on every node")
        if report["ports_in_use"]:
            raise UserError(f"slurm: port(s) {', '.join(map(str, report['ports_in_use']))} on node {node} are in "
                            f"use (another job on the node?); set cluster.port_base to a free block of "
                            f"{SLOT_WIDTH} ports")


def requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=False)


def job_deadline() -> float | None:
    """When this Slurm job's time limit ends (epoch seconds), or None outside a job or without a limit."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return parse_end_time(fields.get("EndTime", ""))


def parse_end_time(value: str) -> float | None:
    """scontrol's EndTime (local time, `2026-11-29T14:30:05`; `Unknown` without a limit)."""
    import time
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def rank_env_from_slurm(env) -> dict:
    """torch.distributed reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, DeepSpeed no SLURM_* variable: under
    plain srun the rank's are mapped from SLURM_PROCID/NTASKS/LOCALID. Empty when a launcher set them."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def device_of(local_rank: int, visible: str | None) -> str | None:
    """The physical GPU a rank uses: its LOCAL_RANK among the devices CUDA_VISIBLE_DEVICES lists."""
    devices = [d for d in (visible or "").split(",") if d.strip()]
    return devices[local_rank % len(devices)] if devices else None


# The sbatch templates and submit_chain.sh, shipped in the wheel; a checkout's top-level slurm/ links here.
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "slurm"


def script_files() -> list[Path]:
    return sorted(p for p in SCRIPTS_DIR.iterdir() if p.suffix in (".sbatch", ".sh"))


def write_scripts(dest: Path, overwrite: bool = False) -> list[Path]:
    """Copy the packaged scripts into dest (created if needed), executable; they travel together, as
    submit_chain.sh submits the sbatch files next to it. Files already there with other contents (a
    copy edited for a cluster) are refused, all named, before anything is written, unless overwrite."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"slurm-scripts: {dest} exists and is not a directory")
    sources = script_files()
    targets = [dest / src.name for src in sources]
    blocked = [t for t in targets if t.is_dir()]
    if blocked:
        raise UserError(f"slurm-scripts: {', '.join(map(str, blocked))}: a directory is in the way")
    differing = [t for src, t in zip(sources, targets) if t.exists() and t.read_bytes() != src.read_bytes()]
    if differing and not overwrite:
        raise UserError(f"slurm-scripts: {', '.join(map(str, differing))} already there with other contents; "
                        "pass --overwrite to replace, or choose another directory")
    for src, target in zip(sources, targets):
        try:
            atomic_write_bytes(target, src.read_bytes(), fsync=False)
            target.chmod(0o755)
        except OSError as e:
            raise UserError(f"slurm-scripts: cannot write {target}: {e.strerror or e}") from None
    return targets
