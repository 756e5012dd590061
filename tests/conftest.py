import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SA_SFT_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["SA_SFT_CACHE_DIR"]) / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    from sa_sft.models import prepare_tiny_model
    return prepare_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)
