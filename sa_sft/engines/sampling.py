"""Exact top-p (nucleus) filtering without sorting the whole vocabulary, for vLLM on CPU.

vLLM's CPU sampler sorts all 49k logits of every sequence at every step to apply top-p;
on a 2-core machine that costs ~40% of generation time (measured: 163 tok/s at top-p 0.9
vs 274 at top-p 1.0 for SmolLM2-135M). The nucleus at usual settings holds a few dozen
tokens, so: take the top K logits (a partial selection, not a sort), and if their
probability mass already reaches p, the nucleus lies inside them and filtering them gives
exactly the tokens a full sort would keep. Rows where it does not (a very flat
distribution) fall back to vLLM's own full-sort implementation. The distribution sampled
from is unchanged; only float summation order differs.
"""
import torch

PREFILTER = 256
_original = None


def nucleus_filter(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, fallback,
                   prefilter: int = PREFILTER) -> torch.Tensor:
    """Mask logits outside the top-k / top-p set to -inf (same semantics as vLLM's apply_top_k_top_p)."""
    vocab = logits.shape[-1]
    width = min(prefilter, vocab)
    if p is None or (k is not None and bool(((k < vocab) & (k > width)).any())):
        return fallback(logits, k, p)
    top_vals, top_idx = logits.topk(width, dim=-1)
    if k is not None:
        beyond_k = torch.arange(width, device=logits.device).unsqueeze(0) >= k.unsqueeze(1).to(torch.long)
        top_vals = top_vals.masked_fill(beyond_k, float("-inf"))
        restricted = (k <= width)
        lse = torch.where(restricted.unsqueeze(1), top_vals.logsumexp(-1, keepdim=True),
                          logits.logsumexp(-1, keepdim=True))
    else:
        restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        lse = logits.logsumexp(-1, keepdim=True)
    probs = (top_vals.float() - lse.float()).exp()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < p.unsqueeze(1).float()
    keep[:, 0] = True
    covered = restricted | (probs.sum(-1) >= p.float())
    filtered = torch.full_like(logits, float("-inf"))
    filtered.scatter_(1, top_idx, torch.where(keep, top_vals, torch.full_like(top_vals, float("-inf"))))
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(1)
        filtered[rows] = fallback(logits[rows].clone(), k[rows] if k is not None else None, p[rows])
    logits.copy_(filtered)
    return logits


def install_fast_top_p() -> bool:
    """Route vLLM's CPU sampler through nucleus_filter. Returns False if this vLLM has no such hook."""
    global _original
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as sampler
    except ImportError:
        return False
    if _original is None:
        if not hasattr(sampler, "apply_top_k_top_p"):
            return False
        _original = sampler.apply_top_k_top_p
        sampler.apply_top_k_top_p = lambda logits, k, p: nucleus_filter(logits, k, p, _original)
    return True
