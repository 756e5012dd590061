"""A real Slurm cluster of logical nodes on this machine: munged, slurmctld and one slurmd per node,
started by hand (no systemd), each with its own files under one directory, and stopped again.

Only the daemons this object started are ever signalled.
"""
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=sasft
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_dir}/munge.sock
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/slurmd.%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=20
KillWait=60
InactiveLimit=0
MinJobAge=600
NodeName={nodes} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={node_ports} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def slurm_installable() -> str | None:
    """None if the daemons are here; else why not."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)" if missing else None


class LocalSlurm:
    def __init__(self, state: Path, nodes: int = 2, cpus_per_node: int = 1, memory_mb: int = 8000,
                 port_base: int = 17000, gpus_per_node: int = 0):
        self.state = state
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.conf = state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None
        # munged runs as its own user, which cannot enter pytest's private temp dirs.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="sa_sft_munge_"))
        self.munge_dir.chmod(0o755)
        hostname = socket.gethostname().split(".")[0]
        self.text = SLURM_CONF.format(
            munge_dir=self.munge_dir, host=hostname, hostname=hostname, state=state, ctld_port=port_base, slurmd_port=port_base + 1,
            nodes=f"n[1-{nodes}]", node_ports=f"[{port_base + 1}-{port_base + nodes}]", cpus=cpus_per_node,
            memory=memory_mb)
        self.gpus = gpus_per_node
        if gpus_per_node:
            # GPUs as generic resources. slurmd accepts a gres.conf File= only if it is a character or
            # block device; device nodes named nvidiaN (with the /dev/null numbers) are enough for it to
            # allocate them and set each step's CUDA_VISIBLE_DEVICES (measured with Debian's Slurm 22.05).
            self.text = self.text.replace("SlurmdParameters=config_overrides",
                                          "SlurmdParameters=config_overrides\nGresTypes=gpu")
            self.text = self.text.replace("State=UNKNOWN", f"Gres=gpu:{gpus_per_node} State=UNKNOWN", 1)
    def start(self, timeout: float = 60) -> None:
        (self.state / "ctld").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.text)
        if self.gpus:
            devices = self.state / "dev"
            devices.mkdir(exist_ok=True)
            for i in range(self.gpus):
                if not (devices / f"nvidia{i}").exists():
                    os.mknod(devices / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            (self.state / "gres.conf").write_text(
                f"NodeName={','.join(self.names)} Name=gpu File={devices}/nvidia[0-{self.gpus - 1}]\n")
        self._start_munge()
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for name in self.names:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", name], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if len(states) == len(self.names) and all(s.startswith("idle") for s in states.values()):
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args}); see {self.state}/*.log")
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle within {timeout} s: {out.stdout!r}; see {self.state}/*.log")

    def _start_munge(self) -> None:
        munge_dir = self.munge_dir
        user = pwd.getpwnam("munge")
        os.chown(munge_dir, user.pw_uid, user.pw_gid)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir}/munge.sock",
                        f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                        f"--seed-file={munge_dir}/seed"], check=True)
        self.munged_pid = int((munge_dir / "munged.pid").read_text())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # Helpers for the tests.
    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kwargs.pop("env", {})}, capture_output=True,
                              text=True, **kwargs)

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, env=env or {}, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        fields = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
        return fields.get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in until:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")
