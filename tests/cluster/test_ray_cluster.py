"""`launchers/ray_submit.py` against a real Ray cluster of two raylets (head + worker) started by the
test: the whole pipeline as one Ray job, engines and training ranks spread over both nodes."""
import json
import subprocess
import sys

import pytest
from conftest import REPO
from local_ray import LocalRay

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, tiny_model):
    cluster = LocalRay(tmp_path_factory.mktemp("ray"), nodes=2, cpus_per_node=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(cluster, *args, timeout=1200):
    return subprocess.run([sys.executable, str(REPO / "launchers" / "ray_submit.py"), "--address", cluster.dashboard,
                           *args], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def test_pipeline_as_a_ray_job_over_two_nodes(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "my.yaml"
    config.write_text((REPO / "sa_sft" / "configs" / "tiny.yaml").read_text())
    proc = submit(ray_cluster, "--cwd", str(tmp_path), str(config), "output_dir=run", "generate.engines=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stderr

    generate = json.loads((run_dir / "generate" / "manifest.json").read_text())
    assert len({node.split("/")[1] for node in generate["engine_nodes"]}) == 2  # an engine on each raylet
    assert len(generate["shards_by_node_this_run"]) == 2
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert len({p["ray_node"] for p in train["placement"]}) == 2  # one rank actor on each raylet
    report = json.loads((run_dir / "report.json").read_text())
    for stage in ("generate", "mix", "train", "evaluate"):
        assert report["stages"][stage]["seconds"] > 0
    assert (run_dir / "config.yaml").exists() and "launcher: ray" in (run_dir / "train" / "config.yaml").read_text()


def test_bad_config_is_refused_before_submitting(ray_cluster):
    proc = submit(ray_cluster, "tiny", "train.ranks=zero")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: config key train.ranks must be an integer; got 'zero'"
