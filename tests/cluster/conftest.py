import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_slurm import LocalSlurm, slurm_installable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def job_env() -> dict:
    """What a user's shell would export to sbatch: this environment's sa-sft first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, tiny_model):
    reason = slurm_installable()
    if reason:
        # CI installs Slurm (.ci/run); there a missing Slurm is a failure, never a skip.
        if os.environ.get("SA_SFT_REQUIRE_CLUSTER"):
            pytest.fail(f"SA_SFT_REQUIRE_CLUSTER is set but Slurm is {reason}")
        pytest.skip(f"Slurm {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=1)
    cluster.start()
    yield cluster
    cluster.stop()
