import json

import pytest

from sa_sft.config import load_config
from sa_sft.errors import UserError
from sa_sft.rundir import RunDir
from sa_sft.train.ds_config import build_ds_config, fill_auto
from sa_sft.train.recipe import lr_factor


def test_stage_skip_resume_refuse(tmp_path):
    run = RunDir(tmp_path)
    stage = run.open_stage("mix", {"mix": {"self_ratio": 1.0}})
    assert stage is not None and not stage.resumed
    # Interrupted (plan, no manifest): the same inputs resume.
    again = run.open_stage("mix", {"mix": {"self_ratio": 1.0}})
    assert again.resumed
    again.finish(counts=1)
    assert run.open_stage("mix", {"mix": {"self_ratio": 1.0}}) is None  # finished: skip
    with pytest.raises(UserError, match=r"mix.self_ratio: 1.0 -> 0.5.*--overwrite"):
        run.open_stage("mix", {"mix": {"self_ratio": 0.5}})
    (tmp_path / "mix" / "keep.txt").write_text("x")
    rebuilt = run.open_stage("mix", {"mix": {"self_ratio": 0.5}}, overwrite=True)
    assert rebuilt is not None and not (tmp_path / "mix" / "keep.txt").exists()


def test_ds_config_autos_are_filled_from_the_trainer_config():
    cfg = load_config("tiny", ["train.micro_batch_size=3", "train.gradient_accumulation_steps=5",
                               "train.learning_rate=0.01", "train.precision=fp32"])
    ds = build_ds_config(cfg.train, hidden_size=128)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(ds)
    for preset in ("zero2", "zero3_offload"):
        cfg.train.deepspeed_config = preset
        assert "auto" not in json.dumps(build_ds_config(cfg.train, hidden_size=128))


def test_unknown_auto_field_is_refused():
    with pytest.raises(UserError, match="no value known for \"auto\" at zero_optimization.sub_group_size"):
        fill_auto({"zero_optimization": {"sub_group_size": "auto"}}, {}, "x.json")
    cfg = load_config("tiny", ["train.deepspeed_config=nope"])
    with pytest.raises(UserError, match="train.deepspeed_config: nope is neither a preset"):
        build_ds_config(cfg.train, hidden_size=128)


def test_lr_schedule():
    assert lr_factor(0, warmup=4, total=10, schedule="cosine", min_ratio=0.1) == 0.25
    assert lr_factor(4, warmup=4, total=10, schedule="cosine", min_ratio=0.1) == 1.0
    assert lr_factor(10, warmup=4, total=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, warmup=4, total=10, schedule="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(9, warmup=0, total=10, schedule="constant", min_ratio=0.0) == 1.0


def test_manifests_record_the_environment_without_secrets(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    for name in ("SA_SFT_API_KEY", "NCCL_SECRET", "RAY_AUTH_TOKEN", "HF_TOKEN", "SLURM_JOB_PASSWORD", "CUDA_AUTH"):
        monkeypatch.setenv(name, "hunter2-value")
    manifest = RunDir(tmp_path).open_stage("mix", {"x": 1}).finish()
    assert manifest["environment"]["NCCL_SOCKET_IFNAME"] == "ib0" and manifest["environment"]["OMP_NUM_THREADS"] == "4"
    assert "hunter2-value" not in (tmp_path / "mix" / "manifest.json").read_text()
    assert "hunter2-value" not in json.dumps(manifest)
