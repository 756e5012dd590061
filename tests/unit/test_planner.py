"""The memory and layout planner against published model shapes, DeepSpeed's own estimator, and the
layouts a user would try (each refusal or acceptance printed with its numbers)."""
import json
from pathlib import Path

import pytest

from sa_sft.cli import main
from sa_sft.config import load_config
from sa_sft.pipeline.planner import GIB, ModelShape, make_plan, read_model_shape, refusal

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes"


@pytest.mark.parametrize("name, params", [("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496),
                                          ("qwen2.5-7b", 7_615_616_512)])
def test_parameter_counts_are_the_published_ones(name, params):
    assert read_model_shape(SHAPES / name).params == params


def gpu_config(model: str, nodes: int, gpus: int, *extra: str):
    return load_config("tiny", [f"model.path={SHAPES / model}", "train.device=cuda", "generate.device=cuda",
                                f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus}", "cluster.gpu_memory_gib=80",
                                f"train.ranks={nodes * gpus}", "train.micro_batch_size=1", "train.max_seq_len=4096",
                                "train.gradient_checkpointing=true", *extra])


def plan(cfg):
    return make_plan(cfg, read_model_shape(Path(cfg.model.path)), 4096)


def test_llama_70b_is_refused_on_one_gpu_and_fits_on_four_nodes_of_eight(capsys):
    one = plan(gpu_config("llama-3-70b", 1, 1))
    assert not one.fits
    assert "train.deepspeed_config=zero3_offload" in str(refusal(one)) and "more nodes" in str(refusal(one))
    four = plan(gpu_config("llama-3-70b", 4, 8, "generate.tensor_parallel_size=8", "generate.engines=4"))
    assert four.fits, [(c.name, c.total_gib, c.problems) for c in four.checks]
    training = four.checks[0]
    assert 40 < training.total_gib < 80  # 18 bytes x 70.6B / 32 ranks = 37 GiB of model states, then activations
    # The same through the command: the table, exit 0; exit 2 with one line when it cannot fit.
    args = ["plan", "tiny", f"model.path={SHAPES / 'llama-3-70b'}", "train.device=cuda", "generate.device=cuda",
            "cluster.gpu_memory_gib=80", "train.micro_batch_size=1", "train.max_seq_len=4096",
            "train.gradient_checkpointing=true"]
    assert main(args + ["cluster.nodes=4", "cluster.gpus_per_node=8", "train.ranks=32", "generate.engines=4",
                        "generate.tensor_parallel_size=8"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "fits" in out and "70.55B parameters" in out
    assert main(args + ["cluster.nodes=1", "cluster.gpus_per_node=1", "train.ranks=1"]) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and captured.err.strip().startswith("error: plan: training does not fit")


def test_llama_8b_is_refused_on_one_gpu_without_offload_and_fits_on_one_node_of_eight():
    one = plan(gpu_config("llama-3-8b", 1, 1))
    training = one.checks[0]
    assert not training.fits and training.total_gib > 134  # 18 bytes x 8.03B = 134.6 GiB of model states
    assert plan(gpu_config("llama-3-8b", 1, 8)).fits
    offloaded = plan(gpu_config("llama-3-8b", 1, 1, "train.deepspeed_config=zero3_offload"))
    assert offloaded.checks[0].fits  # optimizer and parameters in CPU memory


def test_checkpointing_is_what_lets_long_sequences_fit():
    without = plan(gpu_config("llama-3-8b", 1, 8, "train.gradient_checkpointing=false", "train.max_seq_len=8192",
                              "train.micro_batch_size=2"))
    assert not without.checks[0].fits and "train.gradient_checkpointing=true" in without.checks[0].fix
    assert plan(gpu_config("llama-3-8b", 1, 8, "train.max_seq_len=8192", "train.micro_batch_size=2")).checks[0].fits


def test_model_states_match_deepspeeds_zero3_estimator():
    """Parameters + gradients + optimizer + the gathered largest layer = DeepSpeed's estimate, to the byte."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for name, nodes, gpus in (("llama-3-8b", 1, 8), ("llama-3-70b", 4, 8), ("qwen2.5-7b", 2, 8)):
        shape = read_model_shape(SHAPES / name)
        for preset, offload in (("zero3", False), ("zero3_offload", True)):
            check = plan(gpu_config(name, nodes, gpus, f"train.deepspeed_config={preset}")).checks[0]
            ours = sum(r.gib for r in check.rows if r.part.startswith(("parameters", "gradients", "optimizer",
                                                                         "largest")))
            _, theirs, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer_params, gpus, nodes,
                                                                 cpu_offload=offload, cpu_offload_params=offload)
            assert ours * GIB == pytest.approx(theirs, rel=1e-6), (name, preset)


def test_generation_needs_the_gpus_and_the_kv_cache_of_one_sequence():
    cfg = gpu_config("llama-3-70b", 1, 8, "generate.tensor_parallel_size=1")
    generation = plan(cfg).checks[1]
    assert not generation.fits and "less than one 4096-token sequence" in generation.problems[0]
    cfg = gpu_config("llama-3-70b", 1, 8, "generate.tensor_parallel_size=8", "generate.engines=2")
    assert "= 16 GPUs, but the cluster has 8" in plan(cfg).checks[1].problems[0]
    shape = ModelShape.from_config(json.loads((SHAPES / "llama-3-70b" / "config.json").read_text()))
    assert shape.kv_dim == 1024 and shape.head_dim == 128


def test_a_folder_with_only_a_config_is_enough(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((SHAPES / "qwen2.5-7b" / "config.json").read_text())
    assert main(["plan", "tiny", f"model.path={folder}", "train.device=cuda", "cluster.nodes=1",
                 "cluster.gpus_per_node=8", "cluster.gpu_memory_gib=80", "train.ranks=8"]) == 0
    assert "7.62B parameters" in capsys.readouterr().out
    assert main(["plan", "tiny", f"model.path={tmp_path}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
