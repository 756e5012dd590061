import json
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


def lm_eval_task(folder) -> list[str]:
    """A local lm-evaluation-harness task (YAML + JSONL, offline): one-digit sums, four choices."""
    folder.mkdir(parents=True, exist_ok=True)
    items = folder / "items.jsonl"
    items.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": 0,
                                         "choices": [str(a + b), str(a + b + 1), str(a * b + 10), str(a + 20)]}) + "\n"
                             for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (5, 3)]))
    (folder / "tiny_sums.yaml").write_text(f"""task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return [f"evaluate.lm_eval_include_path={folder}",
            "evaluate.suites=[mmlu,humaneval,gen:tests/data/suites/arithmetic.jsonl,lm_eval:tiny_sums]"]


@pytest.fixture(scope="session")
def lm_eval_overrides(tmp_path_factory):
    """Overrides that add the local lm-eval task `tiny_sums` to the evaluation suites."""
    return lm_eval_task(tmp_path_factory.mktemp("lm_eval_tasks"))
