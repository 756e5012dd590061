"""A real Ray cluster of several raylets on this machine (a head with the job API, and workers),
each `ray start --block` in its own process with its own ports and temp dir, token-authenticated.

Only the processes this object started are ever signalled; `ray stop` would kill every Ray here.
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LocalRay:
    def __init__(self, log_dir: Path, nodes: int = 2, cpus_per_node: int = 1, port_base: int = 18000,
                 gpus_per_node: int = 0):
        self.log_dir = log_dir
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.gpus = gpus_per_node  # declared, not real: Ray schedules against them and sets CUDA_VISIBLE_DEVICES
        self.base = port_base
        self.gcs = f"127.0.0.1:{port_base}"
        self.dashboard = f"http://127.0.0.1:{port_base + 1}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []

    def _node_args(self, index: int) -> list[str]:
        p = self.base + 10 + 20 * index
        temp_dir = tempfile.mkdtemp(prefix=f"sa_sft_ray{index}_")
        self.temp_dirs.append(temp_dir)
        return ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                f"--num-gpus={self.gpus}",
                "--object-store-memory=300000000", f"--temp-dir={temp_dir}",
                f"--node-manager-port={p}", f"--object-manager-port={p + 1}", f"--dashboard-agent-grpc-port={p + 2}",
                f"--dashboard-agent-listen-port={p + 3}", f"--metrics-export-port={p + 4}",
                f"--runtime-env-agent-port={p + 5}", f"--min-worker-port={p + 100 * (index + 1)}",
                f"--max-worker-port={p + 100 * (index + 1) + 60}"]

    def start(self, timeout: float = 120) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        head = [ray, "start", "--head", f"--port={self.base}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.base + 1}",
                f"--ray-client-server-port={self.base + 2}", *self._node_args(0)]
        self._spawn(head, "head")
        for index in range(1, self.nodes):
            self._spawn([ray, "start", f"--address={self.gcs}", *self._node_args(index)], f"worker{index}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() == self.nodes:
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a raylet exited ({proc.returncode}); see {self.log_dir}")
            time.sleep(1.0)
        raise RuntimeError(f"{self.alive_nodes()} of {self.nodes} Ray nodes up after {timeout} s; see {self.log_dir}")

    def _spawn(self, cmd: list[str], name: str) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as out:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def alive_nodes(self) -> int:
        code = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.gcs)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
