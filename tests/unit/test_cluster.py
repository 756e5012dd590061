"""Pure parts of the cluster launchers: port blocks, srun commands, node-probe verdicts, the Ray job entrypoint."""
import importlib.util
import shlex

import pytest

from sa_sft.cluster.ports import NODE_PORT_SETS, SLOT_WIDTH, JobPorts, job_ports
from sa_sft.cluster.slurm import check_probes, srun_command
from sa_sft.errors import UserError


def test_job_ports_stay_inside_the_jobs_block_and_do_not_overlap_between_nodes():
    ports = job_ports("123456")
    used = [ports.master, ports.gcs, ports.ray_client]
    for index in range(NODE_PORT_SETS):
        node = ports.node(index)
        used += [p for k, p in node.items() if k not in ("min_worker", "max_worker")]
        used += list(range(node["min_worker"], node["max_worker"] + 1))
    assert len(used) == len(set(used))
    assert ports.base <= min(used) and max(used) < ports.base + SLOT_WIDTH
    assert max(used) < 32768  # below Linux's ephemeral range


def test_neighbouring_jobs_get_different_blocks_and_port_base_wins():
    assert job_ports("100").base != job_ports("101").base
    assert job_ports("100", port_base=20000) == JobPorts(20000)


def test_srun_command_pins_nodes_and_fails_fast(monkeypatch):
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    cmd = srun_command(["n1", "n2"], tasks_per_node=4, overlap=False, cpus_per_task=8)
    assert cmd == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--nodelist=n1,n2",
                   "--kill-on-bad-exit=1", "--cpus-per-task=8"]
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    assert "--gpus-per-node=8" in srun_command(["n1"])
    assert "--overlap" in srun_command(["n1"])


def probe(index, node, **changes):
    report = {"index": index, "node": node, "python": "/venv/bin/python", "run_dir_visible": True,
              "versions": {"torch": "2.13.0", "sa-sft": "0.1.0"}, "ports_in_use": []}
    return {**report, **changes}


@pytest.mark.parametrize("bad, message", [
    ({"run_dir_visible": False}, "the run directory /runs/x is not visible from node n2"),
    ({"python": "/other/python"}, "node n2 runs Python /other/python"),
    ({"versions": {"torch": "2.9.0", "sa-sft": "0.1.0"}}, "node n2 has torch 2.9.0, node n1 has 2.13.0"),
    ({"ports_in_use": [12001]}, "port(s) 12001 on node n2 are in use"),
])
def test_node_probe_verdicts_name_the_node(bad, message):
    check_probes([probe(0, "n1"), probe(1, "n2")], "/runs/x")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_probes([probe(1, "n2", **bad), probe(0, "n1")], "/runs/x")


def load_ray_submit():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "launchers" / "ray_submit.py"
    spec = importlib.util.spec_from_file_location("ray_submit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_job_entrypoint_runs_the_shipped_config_from_cwd_with_ray_ranks():
    ray_submit = load_ray_submit()
    args = ray_submit.parse_args(["my config.yaml", "output_dir=runs/a b", "--cwd", "/shared/work"])
    command = ray_submit.entrypoint(args, shipped_config=True)
    assert command.startswith('config="$PWD/config.yaml"; cd /shared/work && exec ')
    words = shlex.split(command.split("exec ", 1)[1].replace('"$config"', "CONFIG"))
    assert words == ["python", "-m", "sa_sft.cli", "run", "CONFIG", "output_dir=runs/a b", "train.launcher=ray"]
    args = ray_submit.parse_args(["tiny", "train.launcher=torchrun", "--stage", "generate"])
    words = shlex.split(ray_submit.entrypoint(args, shipped_config=False).split("exec ", 1)[1])
    assert words == ["python", "-m", "sa_sft.cli", "generate", "tiny", "train.launcher=torchrun"]
