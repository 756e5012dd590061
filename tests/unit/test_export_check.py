"""The exact export check, on real safetensors folders written by transformers: equal at any precision,
and one changed value in one tensor found and named."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from sa_sft.train.export import compare_tensors, merge_checks, tensor_files


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def exported(request, tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    from sa_sft.models import tiny_config
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tokenizer)).to(request.param)
    model.save_pretrained(tmp_path / "final", safe_serialization=True)
    return model, tmp_path / "final"


def test_an_export_equals_its_model_bit_for_bit(exported):
    model, folder = exported
    check = compare_tensors(folder, model.named_parameters())
    assert check == {"tensors": len(list(model.named_parameters())), "max_abs_diff": 0.0, "mismatched": []}
    merged = merge_checks([check], set(model.state_dict()), folder)
    assert merged["mismatched"] == [] and merged["tensors"] == check["tensors"]


def test_one_corrupted_tensor_is_named(exported):
    model, folder = exported
    (path,) = set(tensor_files(folder).values())
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] += 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    check = compare_tensors(folder, model.named_parameters())
    assert len(check["mismatched"]) == 1 and check["mismatched"][0].startswith("model.layers.1.mlp.up_proj.weight:")
    assert check["max_abs_diff"] == pytest.approx(0.5, rel=0.02)


def test_missing_and_unexpected_tensors_are_mismatches(exported):
    model, folder = exported
    (path,) = set(tensor_files(folder).values())
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"format": "pt"})
    merged = merge_checks([compare_tensors(folder, model.named_parameters())], set(model.state_dict()), folder)
    assert merged["mismatched"] == ["model.norm.weight: not in the export",
                                    "extra.weight: in the export but not a trained parameter or buffer"]


def test_the_streamed_export_is_a_folder_transformers_loads(tmp_path, tokenizer):
    """Tensors written one at a time into shards of a bounded size: several files and their index, as
    save_pretrained writes them, and transformers loads the same weights back."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from sa_sft.models import tiny_config
    from sa_sft.train.export import ShardWriter, write_model_files

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config(tokenizer)).to(torch.bfloat16)
    folder = tmp_path / "final"
    folder.mkdir()
    writer = ShardWriter(folder, max_shard_bytes=2 * 1024**2)
    for name, param in model.named_parameters():
        writer.add(name, param.data)
    files = writer.close()
    write_model_files(folder, model.config, model.generation_config, tokenizer)
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (folder / "model.safetensors.index.json").exists() and not list(folder.glob(".shard-*"))
    assert compare_tensors(folder, model.named_parameters())["mismatched"] == []
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    assert loaded.config.use_cache is True
