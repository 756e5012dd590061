"""The code sandbox with real subprocesses: what passes, what fails, and what it keeps out."""
import os
import time

from sa_sft.evaluate.sandbox import run_python


def test_passing_and_failing_programs():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]").reason == "passed"
    assert run_python("assert 1 == 2").reason == "failed"
    assert run_python("raise ValueError('boom')").reason == "error: ValueError: boom"


def test_an_endless_loop_is_killed_at_the_time_limit():
    started = time.time()
    outcome = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert not outcome.passed and outcome.reason == "timeout"
    assert time.time() - started < 10


def test_no_network_no_memory_hog_no_secrets(monkeypatch):
    outcome = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert not outcome.passed and "unreachable" in outcome.reason.lower()
    assert run_python("x = bytearray(4 * 2**30)", memory_mb=512).reason == "error: MemoryError"
    monkeypatch.setenv("HF_TOKEN", "secret-value")
    assert run_python("import os\nassert not [k for k in os.environ if 'TOKEN' in k]\nassert os.getcwd() != %r" % os.getcwd()).passed


def test_children_of_a_timed_out_program_are_killed_too(tmp_path):
    marker = tmp_path / "alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    assert run_python(program, timeout_s=1.0).reason == "timeout"
    time.sleep(3.5)
    assert not marker.exists()


def test_every_humaneval_reference_solution_passes_in_the_sandbox():
    """The program assembly (prompt + completion + tests + check call) is right: the canonical
    solutions score 164/164, and an empty body scores 0."""
    from sa_sft.config import load_config
    from sa_sft.evaluate.generation import score_generated
    from sa_sft.evaluate.suites import load_suite

    cfg = load_config("tiny", ["evaluate.allow_code_execution=true", "evaluate.suites=[humaneval]"])
    suite = load_suite("humaneval", 0)
    assert len(suite.rows) == 164
    score, records = score_generated(cfg, suite, [row["canonical_solution"] for row in suite.rows])
    assert score["value"] == 1.0, [r for r in records if not r["correct"]][:3]
    score, _ = score_generated(cfg, suite, ["    pass\n"] * len(suite.rows))
    assert score["value"] == 0.0
