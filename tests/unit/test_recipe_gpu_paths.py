"""The trainer's GPU-only steps, checked on CPU with the CUDA calls recorded instead of made: each rank
selects its device before the NCCL process group exists, and the CUDA RNG state travels in the
checkpoint. (The rest of the recipe runs for real in tests/integration/test_training.py.)"""
import pytest
import torch

from sa_sft.config import load_config
from sa_sft.rundir import RunDir
from sa_sft.train.recipe import SFTRecipe, cuda_device


class Stop(Exception):
    pass


def test_a_rank_selects_its_gpu_before_the_process_group(monkeypatch, tmp_path):
    import deepspeed

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))

    def init_distributed(dist_backend=None, **_):
        calls.append(("init_distributed", dist_backend))
        raise Stop

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.delenv("RANK", raising=False)
    for key, value in {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(key, value)
    recipe = SFTRecipe(load_config("tiny", ["train.device=cuda", "train.launcher=srun"]), RunDir(tmp_path))
    with pytest.raises(Stop):
        recipe.setup_distributed()
    assert calls == [("set_device", 3), ("init_distributed", "nccl")]


def test_device_index():
    assert cuda_device(3, 8) == 3      # srun/torchrun: every GPU of the node visible
    assert cuda_device(0, 1) == 0      # Ray: only the rank's own GPU visible
    from sa_sft.errors import UserError
    with pytest.raises(UserError, match="sees no GPU"):
        cuda_device(0, 0)


class FakeEngine:
    """DeepSpeed's checkpoint calls, reduced to what the recipe relies on."""

    def save_checkpoint(self, path, tag, client_state, save_latest):
        (torch.save(client_state, f"{path}/{tag}/client.pt"))

    def load_checkpoint(self, path, tag):
        return None, torch.load(f"{path}/{tag}/client.pt")


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_cuda_rng_state_is_saved_and_restored(monkeypatch, tmp_path, process_group):
    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s))
    run = RunDir(tmp_path / "run")
    cfg = load_config("tiny", ["train.device=cuda", "train.keep_last=1"])
    recipe = SFTRecipe(cfg, run)
    recipe.rank, recipe.world, recipe.engine, recipe.step, recipe.saved_at = 0, 1, FakeEngine(), 7, -1
    recipe.save_checkpoint()
    assert run.checkpoints.latest() == "step-0000007" and recipe.save_seconds >= 0
    assert torch.equal(torch.load(run.checkpoints.rng_state("step-0000007", 0))["cuda"], state)
    again = SFTRecipe(cfg, run)
    again.rank, again.world, again.engine = 0, 1, FakeEngine()
    again.resume()
    assert again.step == 7 and len(restored) == 1 and torch.equal(restored[0], state)
