"""MFU arithmetic (sa_sft/train/mfu.py): PaLM's FLOPs per token, per-sample attention for packed and
padded batches, frozen and untied-embedding parameters, the datasheet table, the measured peak."""
import pytest
import torch

from sa_sft.train.mfu import (MEASURED, datasheet_peak, device_peak, flops_per_token, matmul_params,
                              measure_matmul_peak, mfu, same_host_peaks, step_flops)


def test_flops_per_token_is_palms_6n_plus_12lhqt():
    # PaLM 540B (appendix B): N = 540.35e9, L = 118, H = 48 heads x Q = 256, T = 2048: 6N dominates
    # and attention adds 12 * 118 * 12288 * 2048 = 3.56e10 per token.
    n, layers, attn_dim, context = 540_350_000_000, 118, 48 * 256, 2048
    assert flops_per_token(n, layers, attn_dim, context) == 6 * n + 12 * layers * attn_dim * context
    assert 12 * layers * attn_dim * context == pytest.approx(3.56e10, rel=1e-3)


def test_attention_counts_each_samples_own_length():
    """Two samples packed in one 512-token sequence attend over 200 and 300 tokens, not 512: the
    same FLOPs as the two alone, and less than one 500-token sample (200² + 300² < 500²)."""
    params, layers, dim = 1000, 2, 64
    packed = step_flops(params, params, layers, dim, [200, 300])
    alone = step_flops(params, params, layers, dim, [200]) + step_flops(params, params, layers, dim, [300])
    assert packed == alone
    assert packed == 6 * params * 500 + 12 * layers * dim * (200 ** 2 + 300 ** 2)
    assert packed < step_flops(params, params, layers, dim, [500])


def test_frozen_parameters_count_the_forward_only():
    assert step_flops(100, 100, 0, 0, [10]) == 6 * 100 * 10
    assert step_flops(100, 0, 0, 0, [10]) == 2 * 100 * 10       # all frozen: forward only
    assert step_flops(100, 40, 0, 0, [10]) == (2 * 100 + 4 * 40) * 10


def test_an_untied_input_embedding_is_a_lookup_not_a_matmul():
    # Llama-3-8B: 8.03e9 parameters, a 128256 x 4096 input embedding not tied to the output head.
    emb = 128256 * 4096
    assert matmul_params(8_030_261_248, 8_030_261_248, emb, tied=False) == (8_030_261_248 - emb,) * 2
    # SmolLM2's embedding is the output head too: every parameter is in a matmul.
    assert matmul_params(134_515_008, 134_515_008, 49152 * 576, tied=True) == (134_515_008, 134_515_008)
    # A frozen untied embedding is taken out of the total but was never in the trainable count.
    assert matmul_params(1000, 900, 100, tied=False) == (900, 800)


def test_datasheet_peaks_by_device_name():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12          # the SXM board's name
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert datasheet_peak("NVIDIA H200", "bf16") == 989e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert datasheet_peak("NVIDIA L40S", "bf16") == 362e12                   # not taken for an L4
    assert datasheet_peak("NVIDIA L4", "bf16") == 121e12
    assert datasheet_peak("NVIDIA A10", "bf16") == 125e12                    # not taken for an A100
    assert datasheet_peak("NVIDIA GeForce RTX 3090", "bf16") is None


def test_mfu_and_the_configured_peak():
    assert mfu(4e12, 2.0, 4e12) == 0.5
    assert mfu(1.0, 0.0, 1.0) == 0.0
    assert device_peak("cpu", "bf16", torch.bfloat16, override_tflops=2.5) == (2.5e12, "train.peak_tflops")


def test_the_cpu_peak_is_a_timed_matmul_labelled_as_measured():
    peak, source = device_peak("cpu", "fp32", torch.float32)
    assert source.startswith(MEASURED)
    # Somewhere between a slow core and a big server's worth of them, on the thread count set here.
    assert 1e9 < peak < 1e14
    assert measure_matmul_peak(torch.float32, "cpu", size=256, repeats=1, min_seconds=0) > 0


def test_ranks_of_a_host_share_its_best_reading():
    assert same_host_peaks([3.0, 1.0, 2.0, 5.0], ["a", "a", "b", "b"]) == [3.0, 3.0, 5.0, 5.0]
