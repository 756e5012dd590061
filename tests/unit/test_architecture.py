"""The architecture holds: layers import only downward (lint-imports, the contracts in
pyproject.toml), no module imports another in a loop, the run directory's files are named in
one module, and the stage list exists once."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sa_sft"


def test_lint_imports_keeps_the_layers_and_finds_no_import_loops():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_the_contract_would_catch_an_arrow_back_up(tmp_path):
    """A copy of the package with one upward import (a stage importing the pipeline) breaks the layers."""
    import shutil
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "sa_sft", ignore=shutil.ignore_patterns("__pycache__", "builtin"))
    stage = copy / "sa_sft" / "mix" / "stage.py"
    stage.write_text(stage.read_text() + "\nfrom sa_sft.pipeline.runner import run_stages  # noqa\n")
    shutil.copyfile(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "sa_sft.mix is not allowed to import sa_sft.pipeline" in proc.stdout


# File and folder names of a run directory: only sa_sft/rundir.py may spell them, in code (docstrings
# and comments may name them). Names that are also ordinary words ("final", "eval") count where a
# path is built from them: joined with `/`, or next to a slash inside a string.
FILE_NAMES = ("manifest.json", "plan.json", "config.yaml", "sa_sft.log", "report.json", "report.md",
              "selection.jsonl", "metrics.jsonl", "train.log", "interrupted.json", "sa_sft_export.json",
              "retention.json", "drift.json", "compare.json", "compare.md", "error.json", "generations.jsonl",
              "trackers.json")
FOLDERS = ("shards", "rejected", "minhash", "heldout", "final", "eval", "checkpoints", "tensorboard", "latest", "plots",
           "logs", "mix", "train", "generate", "evaluate", "work", ".lock", ".slurm_probe", "mlruns")
PREFIXES = ("rank-", "shard-", "step-")
FILE_RE = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in FILE_NAMES) + r")\b")
SLASHED_RE = re.compile(r"(^|/)(" + "|".join(re.escape(n) for n in FOLDERS) + r")(/|$)")


def string_text(node) -> str | None:
    """The text of a string literal; an f-string's replacement fields become `{}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def path_pieces(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every string in code that names a run-directory path piece."""
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and string_text(body[0].value) is not None:
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "Random":
            skip.update(id(a) for a in node.args)  # seed strings like f"{seed}/mix" are not paths
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)  # its parts are checked as one string
    joined = {id(node.right) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)}
    found = []
    for node in ast.walk(tree):
        text = string_text(node)
        if text is None or id(node) in skip:
            continue
        named = FILE_RE.search(text) or ("/" in text and SLASHED_RE.search(text))
        piece = id(node) in joined and (text in FOLDERS or text.startswith(PREFIXES))
        if named or piece:
            found.append((node.lineno, text))
    return found


# Strings that look like paths but are not: the trackers' metric names.
NOT_PATHS = {("sa_sft/trackers.py", "train/{}"), ("sa_sft/trackers.py", "train/{}_rank{}"),
             ("sa_sft/trackers.py", "train/loss")}


def test_no_path_piece_of_the_run_directory_outside_the_run_directory_module():
    found = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in sorted(PACKAGE.rglob("*.py"))
             if path != PACKAGE / "rundir.py" for line, text in path_pieces(path.read_text())
             if (str(path.relative_to(REPO)), text) not in NOT_PATHS]
    assert not found, "run-directory paths spelled outside sa_sft/rundir.py:\n" + "\n".join(found)


def test_the_check_sees_a_hand_built_path():
    assert path_pieces('path = run_dir / "train" / "metrics.jsonl"')
    assert path_pieces('model = run_dir / "final"')
    assert path_pieces('folder = run_dir / f"rank-{rank:05d}"')
    assert path_pieces('x = Path("runs/x/train/final")')
    assert path_pieces('opt(1, help="steps per line in train/metrics.jsonl")')
    assert not path_pieces('models = {"base": a, "final": b}')
    assert not path_pieces('random.Random(f"{seed}/train/epoch{epoch}").shuffle(order)')
    assert not path_pieces('def f():\n    """Writes eval/drift.json."""\n')


def test_every_command_reads_the_one_stage_registry():
    from sa_sft.cli import build_parser
    from sa_sft.pipeline.stages import SLURM_STEPS, STAGE_NAMES, STAGES

    assert STAGE_NAMES == ("generate", "mix", "train", "evaluate")
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGE_NAMES) | {"run"} <= set(commands)
    # Every stage runs in exactly one `sa-sft slurm` step, and `run` runs them all in order.
    steps = [name for step, names in SLURM_STEPS.items() if step not in ("run", "check") for name in names]
    assert sorted(steps) == sorted(STAGE_NAMES) and SLURM_STEPS["run"] == list(STAGE_NAMES)
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import ray_submit
    finally:
        sys.path.pop(0)
    assert ray_submit.COMMANDS == ("run", *STAGE_NAMES)
    for spec in STAGES:  # each names a module with the two functions the runner calls
        module = spec.load()
        assert callable(module.inputs) and callable(module.run_stage), spec.name
        assert spec.describe_outputs().startswith("RUN/")


@pytest.mark.parametrize("module", ["sa_sft.train.checkpoints", "sa_sft.rundir", "sa_sft.pipeline.stages",
                                    "sa_sft.cli"])
def test_light_modules_do_not_import_the_heavy_libraries(module):
    """The CLI's parser, the registry and the checkpoint policy import neither torch nor DeepSpeed, vLLM or Ray."""
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'deepspeed', 'vllm', 'ray') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
