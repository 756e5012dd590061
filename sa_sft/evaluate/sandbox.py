"""Running model-written code (HumanEval) in a sandboxed subprocess.

Each program runs in a fresh temporary directory, in a new network namespace with no
interfaces (`unshare --net`, as an unprivileged user namespace), in its own session, with
limits on address space, CPU seconds, file size and open files, a wall-clock timeout that
kills the whole process group, and an environment holding nothing but PATH and HOME (no
tokens or keys). Without network isolation available the sandbox refuses to run anything.
"""
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from sa_sft.errors import UserError

ISOLATE = ["unshare", "--net", "--map-root-user"]


@dataclass
class Outcome:
    passed: bool
    reason: str   # passed | failed | timeout | error: <last line of stderr>


@functools.cache
def check_isolation() -> None:
    if shutil.which("unshare") is None:
        raise UserError("code execution needs `unshare` (util-linux) for a network-isolated sandbox; "
                        "install it or drop the code suite from evaluate.suites")
    probe = subprocess.run([*ISOLATE, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise UserError("code execution needs unprivileged user namespaces for a network-isolated sandbox "
                        f"(`unshare --net --map-root-user` failed: {probe.stderr.strip() or probe.returncode}); "
                        "drop the code suite from evaluate.suites on this machine")


def limit_resources(memory_mb: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `program` with the sandbox's limits; passed when it exits 0 within the time limit."""
    check_isolation()
    with tempfile.TemporaryDirectory(prefix="sa_sft_sandbox_") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [*ISOLATE, sys.executable, "-I", "-B", path], cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=functools.partial(limit_resources, memory_mb, int(timeout_s) + 1))
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode == 0:
        return Outcome(True, "passed")
    last = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return Outcome(False, "failed" if last[0].startswith("AssertionError") else f"error: {last[0][:200]}")
