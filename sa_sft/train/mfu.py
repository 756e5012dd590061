"""Model FLOPs utilisation: the FLOPs a training step must do for the model, over what the devices
could do at peak. Pure functions (the matmul timing aside), so the arithmetic is tested alone.

FLOPs of a step follow the PaLM paper's appendix B: per token 6·N for the weight matmuls (2·N
forward, 4·N backward: gradients of activations and of weights) plus 12·L·H·Q·T for attention (QKᵀ
and AV, forward and backward; H·Q = heads x head size, T the context the token attends over; no
discount for the causal mask, as in PaLM). Two refinements for fine-tuning:

- N counts the parameters that enter matmuls: an untied input embedding is a table lookup, not a
  matmul, so it is left out (a tied one is the output projection and stays in); frozen parameters
  get the forward 2·N only (a lower bound: their activations' gradients may still be computed).
- T is each sample's own length: padding is not work, and a packed sample attends only within
  itself (block-diagonal mask), so a step's attention term is 12·L·H·Q·Σ n² over its samples.

The peak is a datasheet figure for known GPUs (dense, no 2:4 sparsity) or, on CPUs and unknown
devices, a dense matmul timed on the same cores in the training dtype (labelled as measured).
"""
import re
import time

# Per-device dense peaks in TFLOP/s from NVIDIA's datasheets: bf16 on tensor cores, fp32 on CUDA
# cores (not TF32). The first pattern that matches torch.cuda.get_device_name() wins, so the more
# specific names come first ("L40S" before "L4", "A100" before "A10").
DATASHEET_TFLOPS = (
    (r"\bB200\b", "NVIDIA B200", {"bf16": 2250.0, "fp32": 75.0}),
    (r"\bH200 NVL\b", "NVIDIA H200 NVL", {"bf16": 835.0, "fp32": 60.0}),
    (r"\bH200\b", "NVIDIA H200 SXM", {"bf16": 989.0, "fp32": 67.0}),
    (r"\bH100 NVL\b", "NVIDIA H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    (r"\bH100 PCIe\b", "NVIDIA H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    (r"\bH100\b", "NVIDIA H100 SXM", {"bf16": 989.0, "fp32": 67.0}),
    (r"\bA100\b", "NVIDIA A100", {"bf16": 312.0, "fp32": 19.5}),
    (r"\bL40S\b", "NVIDIA L40S", {"bf16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", "NVIDIA L4", {"bf16": 121.0, "fp32": 30.3}),
    (r"\bA10\b", "NVIDIA A10", {"bf16": 125.0, "fp32": 31.2}),
)
MEASURED = "measured matmul peak, not a datasheet figure"


def matmul_params(total: int, trainable: int, input_embedding: int, tied: bool) -> tuple[int, int]:
    """(parameters in matmuls, of which trainable): an untied input embedding is a lookup, no matmul.
    `trainable` may include that embedding; it is taken out of both counts alike."""
    lookup = 0 if tied else input_embedding
    return total - lookup, max(0, trainable - lookup)


def step_flops(params: int, trainable: int, layers: int, attn_dim: int, seq_lens: list[int]) -> float:
    """Model FLOPs of one forward + backward over samples of these lengths (real tokens only).
    attn_dim = attention heads x head size (the hidden size in most models)."""
    tokens = sum(seq_lens)
    weights = (2 * params + 4 * trainable) * tokens
    attention = 12 * layers * attn_dim * sum(n * n for n in seq_lens)
    return float(weights + attention)


def flops_per_token(params: int, layers: int, attn_dim: int, context: int) -> float:
    """PaLM's 6·N + 12·L·H·Q·T for one token of a sequence of `context` tokens, all trainable."""
    return step_flops(params, params, layers, attn_dim, [context]) / context


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU in this precision, else None."""
    for pattern, _, peaks in DATASHEET_TFLOPS:
        if re.search(pattern, device_name) and precision in peaks:
            return peaks[precision] * 1e12
    return None


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / seconds / peak_flops if seconds > 0 and peak_flops > 0 else 0.0


def measure_matmul_peak(dtype, device: str = "cpu", size: int = 0, repeats: int = 5, min_seconds: float = 1.0) -> float:
    """The best FLOP/s of a square matmul in `dtype` on this device and thread count: a peak the
    hardware demonstrably reaches here, for devices without a datasheet figure. The best of at least
    `repeats` runs and `min_seconds`, since other processes on the same cores only make it slower."""
    import torch

    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, runs, started = 0.0, 0, time.perf_counter()
    while runs <= repeats or time.perf_counter() - started < min_seconds:  # run 0 warms up (AMX tiles)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
        runs += 1
        if runs > 50:
            break
    return best


def same_host_peaks(peaks: list[float], hosts: list[str]) -> list[float]:
    """Each rank's measured peak raised to the best any rank measured on its host: ranks of one node
    share its kind of cores, and a lower reading only says another process held them at the time."""
    best = {}
    for peak, host in zip(peaks, hosts):
        best[host] = max(best.get(host, 0.0), peak)
    return [best[host] for host in hosts]


def device_peak(device: str, precision: str, dtype, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it comes from): the configured value, a datasheet figure, or a
    timed matmul on this device."""
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = datasheet_peak(name, precision)
        if peak:
            return peak, f"datasheet: {name}, {precision} dense"
    return measure_matmul_peak(dtype, device), f"{MEASURED} ({precision}, this device and thread count)"
