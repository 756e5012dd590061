"""Evaluation scores on the vLLM engines agree with transformers' on the same items (tiny and default models).

transformers is the reference here only: the evaluate stage scores on the engines alone. Both run in
fp32 on CPU, where the two attention implementations differ by float rounding; the tolerance is
2e-3 nats per token (mean NLL) and the same choice on every multiple-choice item but near-ties."""
import math

import pytest
import torch

from sa_sft.chat import IGNORE_INDEX, tokenize_conversation

pytestmark = pytest.mark.integration

TOLERANCE = 2e-3


@torch.no_grad()
def reference_logprobs(model, sequences, positions):
    out = []
    for ids, where in zip(sequences, positions):
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        out.append([float(logp[i - 1, ids[i]]) for i in where])
    return out


def conversations():
    from sa_sft.data.task import read_task_data
    rows = read_task_data("builtin:gsm_symbolic").rows[:6]
    chats = [[{"role": "user", "content": "Name three primary colours."},
              {"role": "assistant", "content": "Red, yellow and blue."}],
             [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]]
    return [r["messages"] for r in rows] + chats


@pytest.mark.parametrize("model_name", ["tiny", "default"])
def test_engine_scores_match_transformers(model_name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.config import load_config
    from sa_sft.evaluate import scoring
    from sa_sft.evaluate.stage import Engines
    from sa_sft.evaluate.suites import load_suite
    from sa_sft.models import resolve_model

    cfg = load_config("tiny", [f"model.path={model_name}", "generate.dtype=float32", "evaluate.max_seq_len=512",
                               f"output_dir={tmp_path}"])
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    nll = scoring.nll_requests(tokenizer, conversations(), 512)
    mmlu = load_suite("mmlu", 12).rows
    mc = scoring.mc_text_requests(tokenizer, mmlu, 512)
    letters = scoring.mc_letter_requests(tokenizer, mmlu, 512)
    with ray_session("") as own_machine:
        engines = Engines(cfg, path, own_machine)
        try:
            got = {"nll": engines.score(nll), "mc": engines.score(mc), "letters": engines.score(letters)}
        finally:
            engines.close()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = {"nll": reference_logprobs(model, nll.sequences, nll.positions),
            "mc": reference_logprobs(model, mc.sequences, mc.positions),
            "letters": reference_logprobs(model, letters.sequences, letters.positions)}
    # Per token and per conversation: the same numbers within float rounding.
    flat = lambda lps: [x for lp in lps for x in lp]
    assert max(abs(a - b) for a, b in zip(flat(got["nll"]), flat(want["nll"]))) < 20 * TOLERANCE
    ours, theirs = scoring.nll_result(got["nll"]), scoring.nll_result(want["nll"])
    assert abs(ours["mean_nll"] - theirs["mean_nll"]) < TOLERANCE
    assert all(abs(a - b) < TOLERANCE for a, b in zip(ours["per_sample_mean_nll"], theirs["per_sample_mean_nll"]))
    # The scored positions are exactly the assistant tokens the trainer learns.
    t = tokenize_conversation(tokenizer, conversations()[0], 512)
    assert len(nll.positions[0]) == sum(1 for x in t.labels[1:] if x != IGNORE_INDEX)
    for kind, reduce in (("mc", scoring.mc_text_result), ("letters", scoring.mc_letter_result)):
        a, b = reduce(mmlu, got[kind]), reduce(mmlu, want[kind])
        differ = [i for i, (x, y) in enumerate(zip(a["per_item"], b["per_item"])) if x != y]
        assert len(differ) <= 1, (kind, differ)
    assert math.isfinite(ours["mean_nll"]) and ours["tokens"] > 50


def test_engines_serve_the_base_then_another_checkpoint(tmp_path, tiny_model):
    """Evaluation scores the base, then the fine-tuned checkpoint: the scores after the switch are the
    other checkpoint's, as transformers computes them (tied embeddings included)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.config import load_config
    from sa_sft.evaluate import scoring
    from sa_sft.evaluate.stage import Engines

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = load_file(str(other / "model.safetensors"))
    torch.manual_seed(3)
    weights = {k: (v.float() + 0.05 * torch.randn_like(v.float())).to(v.dtype) for k, v in weights.items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    cfg = load_config("tiny", ["generate.dtype=float32", "evaluate.max_seq_len=512", f"output_dir={tmp_path}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    requests = scoring.nll_requests(tokenizer, conversations(), 512)
    with ray_session("") as own_machine:
        engines = Engines(cfg, tiny_model, own_machine)
        try:
            before = engines.score(requests)
            engines.serve(other)
            after = engines.score(requests)
        finally:
            engines.close()
    for path, got in ((tiny_model, before), (other, after)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        want = reference_logprobs(model, requests.sequences, requests.positions)
        assert abs(scoring.nll_result(got)["mean_nll"] - scoring.nll_result(want)["mean_nll"]) < TOLERANCE, path
    assert abs(scoring.nll_result(before)["mean_nll"] - scoring.nll_result(after)["mean_nll"]) > 10 * TOLERANCE
