"""Simulated GPU clusters with real daemons: a Ray cluster whose raylets declare GPUs and a Slurm
cluster with GPU GRES. `--dry-run` places every engine and rank for real (Ray actors, srun steps)
with a probe in place of the work; the tests assert what each process would see. No GPU is used
or pretended: CUDA_VISIBLE_DEVICES is what Ray and Slurm hand each process."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, job_env
from local_ray import LocalRay
from local_slurm import LocalSlurm, slurm_installable

pytestmark = [pytest.mark.gpu_sim, pytest.mark.cluster]

GPU_CLUSTER = ["train.device=cuda", "generate.device=cuda", "cluster.nodes=2", "cluster.gpus_per_node=2",
               "cluster.gpu_memory_gib=80", "train.ranks=4", "generate.engines=2", "generate.tensor_parallel_size=2"]


def sa_sft(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ray_gpus(tmp_path_factory, tiny_model):
    cluster = LocalRay(tmp_path_factory.mktemp("ray_gpus"), nodes=2, cpus_per_node=2, gpus_per_node=2,
                       port_base=18400)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_ray_ranks_each_see_their_own_gpu(ray_gpus, tmp_path):
    proc = sa_sft("train", "--dry-run", "tiny", f"output_dir={tmp_path / 'run'}", "train.launcher=ray",
                  f"cluster.ray_address={ray_gpus.gcs}", *GPU_CLUSTER, env=ray_gpus.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(proc.stdout)["train"]["ranks"]
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1", "2", "3"]
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"4"}
    # Each rank's actor holds one GPU of its node: its own CUDA_VISIBLE_DEVICES, so device 0 there.
    assert all(r["CUDA_VISIBLE_DEVICES"] is not None and len(r["CUDA_VISIBLE_DEVICES"].split(",")) == 1 for r in ranks)
    assert len({(r["node"], r["CUDA_VISIBLE_DEVICES"]) for r in ranks}) == 4
    assert {r["env"]["LOCAL_RANK"] for r in ranks} == {"0"}
    assert len({r["node"] for r in ranks}) == 2  # PACK: two ranks on each node
    # One rendezvous for all: rank 0's node's address as Ray lists it, a port free there.
    assert len({r["env"]["MASTER_ADDR"] for r in ranks}) == 1 and len({r["env"]["MASTER_PORT"] for r in ranks}) == 1
    assert ranks[0]["command"][1:3] == ["-m", "sa_sft.train.trainer"]


def test_ray_engines_get_a_placement_group_each_on_one_node(ray_gpus, tmp_path):
    proc = sa_sft("generate", "--dry-run", "tiny", f"output_dir={tmp_path / 'run'}", "train.launcher=ray",
                  f"cluster.ray_address={ray_gpus.gcs}", *GPU_CLUSTER, env=ray_gpus.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engines = json.loads(proc.stdout)["engines"]
    assert len(engines) == 2
    for engine in engines:  # the tensor-parallel workers of an engine: one node, two different GPUs
        workers = engine["workers"]
        assert len(workers) == 2 and len({w["node"] for w in workers}) == 1
        assert sorted(w["CUDA_VISIBLE_DEVICES"] for w in workers) == ["0", "1"]
        assert engine["env"].get("VLLM_ENABLE_V1_MULTIPROCESSING") is None  # vLLM's own processes on GPUs
    assert len({e["workers"][0]["node"] for e in engines}) == 2  # the two engines on the two nodes


def test_ray_refuses_at_once_what_the_cluster_cannot_hold(ray_gpus, tmp_path):
    proc = sa_sft("generate", "--dry-run", "tiny", f"output_dir={tmp_path / 'run'}", "train.launcher=ray",
                  f"cluster.ray_address={ray_gpus.gcs}", *GPU_CLUSTER, "generate.engines=3",
                  "cluster.gpus_per_node=4", env=ray_gpus.env,
                  timeout=120)
    assert proc.returncode == 2
    assert "= 6 GPUs, but" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def slurm_gpus(tmp_path_factory, tiny_model):
    reason = slurm_installable()
    if reason:
        if os.environ.get("SA_SFT_REQUIRE_CLUSTER"):
            pytest.fail(f"SA_SFT_REQUIRE_CLUSTER is set but Slurm is {reason}")
        pytest.skip(f"Slurm {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm_gpus"), nodes=2, cpus_per_node=2, gpus_per_node=2,
                         port_base=17100)
    cluster.start()
    yield cluster
    cluster.stop()


def test_slurm_job_places_raylets_engines_and_ranks_on_the_allocations_gpus(slurm_gpus, tmp_path):
    """`sa-sft slurm run --dry-run` in a 2-node x 2-GPU job: the preflight passes the multi-node layout,
    each node's raylet step holds its node's CPUs and GPUs, the engines are spread over the nodes
    (a placement group each), and every rank of the srun step sees the node's GPUs and picks its own."""
    out = tmp_path / "job.out"
    args = " ".join(["tiny", f"output_dir={tmp_path / 'run'}", *GPU_CLUSTER, "train.launcher=torchrun"])
    job = slurm_gpus.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=2",
                            f"--output={out}", f"--wrap=sa-sft slurm run --dry-run {args}",
                            env=job_env(), cwd=tmp_path)
    state = slurm_gpus.wait(job, timeout=600)
    text = out.read_text(errors="replace") if out.exists() else ""
    assert state == "COMPLETED", text[-4000:]
    report = json.loads(text[text.index("{\n"):])
    assert report["nodes"] == ["n1", "n2"] and report["stages"] == ["generate", "mix", "train", "evaluate"]
    raylets = report["raylets"]
    assert "--cpus-per-task=2" in raylets["command"] and "--gpus-per-node=2" in raylets["command"]
    assert sorted(r["node"] for r in raylets["nodes"]) == ["n1", "n2"]
    assert all(r["CUDA_VISIBLE_DEVICES"] == "0,1" for r in raylets["nodes"])
    engines = report["engines"]
    assert sorted(e["workers"][0]["node"].split("/")[0] for e in engines) == ["n1", "n2"]
    assert all(sorted(w["CUDA_VISIBLE_DEVICES"] for w in e["workers"]) == ["0", "1"] for e in engines)
    ranks = report["train"]["ranks"]
    assert [(r["env"]["RANK"], r["node"], r["env"]["LOCAL_RANK"], r["gpu"]) for r in ranks] == [
        ("0", "n1", "0", "0"), ("1", "n1", "1", "1"), ("2", "n2", "0", "0"), ("3", "n2", "1", "1")]
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"4"}
    assert {r["env"]["MASTER_ADDR"] for r in ranks} == {report["addresses"]["n1"]}
    assert all(r["CUDA_VISIBLE_DEVICES"] == "0,1" for r in ranks)
    assert "--ntasks-per-node=2" in report["train"]["command"]


def test_the_planner_refuses_a_layout_before_the_job_waits(tmp_path, tiny_model):
    proc = sa_sft("run", "--dry-run", "tiny", f"output_dir={tmp_path / 'run'}", *GPU_CLUSTER, "train.launcher=srun",
                  "cluster.gpus_per_node=1")
    assert proc.returncode == 2
    assert "train.ranks=4 but the cluster has 2 GPU(s)" in proc.stderr.strip().splitlines()[-1]
