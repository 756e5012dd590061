"""The fast top-p path keeps exactly the tokens vLLM's full-sort implementation keeps."""
import pytest
import torch

ref_module = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")

from sa_sft.engines.sampling import nucleus_filter  # noqa: E402


def reference(logits, k, p):
    return ref_module.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0, 12.0])  # flat (fallback rows) to peaked (fast rows)
@pytest.mark.parametrize("top_k", [None, 20])
def test_same_kept_set_as_full_sort(scale, top_k):
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(16, 49152, generator=gen) * scale
    p = torch.linspace(0.5, 0.95, 16)
    k = None if top_k is None else torch.full((16,), top_k)
    expected = reference(logits.clone(), k, p)
    got = nucleus_filter(logits.clone(), k, p, reference)
    assert torch.equal(torch.isinf(expected), torch.isinf(got))
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])


def test_without_top_p_defers_to_vllm():
    logits = torch.randn(4, 1000)
    calls = []
    nucleus_filter(logits, torch.full((4,), 5), None, lambda l, k, p: calls.append(1) or l)
    assert calls == [1]
