"""The quiet terminal: sa-sft's own lines on the terminal, every other byte (Python, C, child
processes) in the stage's log file; -v leaves everything on the terminal."""
import subprocess
import sys
import textwrap

from sa_sft import console

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path
    from sa_sft import console
    console.setup(sys.argv[2] == "verbose")
    logging.getLogger("sa_sft.stage").info("own line before")
    with console.capture(Path(sys.argv[1])):
        print("library print")
        os.system("echo child process")
        os.write(2, b"C-level write\\n")
        logging.getLogger("vllm").warning("library warning")
        warnings.warn("a python warning")
        logging.getLogger("sa_sft.stage").info("own line inside")
    print("error: the last line", file=sys.stderr)
""")


def run(tmp_path, mode):
    log = tmp_path / "logs" / "stage.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr, log.read_text() if log.exists() else ""


def test_quiet_keeps_only_own_lines_on_the_terminal(tmp_path):
    terminal, logged = run(tmp_path, "quiet")
    lines = terminal.strip().splitlines()
    assert [line.split(": ", 1)[-1] for line in lines] == ["own line before", "own line inside", "the last line"]
    assert lines[-1] == "error: the last line"
    for text in ("library print", "child process", "C-level write", "library warning", "a python warning"):
        assert text in logged and text not in terminal


def test_verbose_shows_everything(tmp_path):
    terminal, logged = run(tmp_path, "verbose")
    for text in ("own line inside", "library print", "child process", "C-level write", "library warning"):
        assert text in terminal
    assert logged == ""


def test_problems_skip_start_up_chatter(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO fine\n"
                   "(MainProcess pid=1) WARNING [cpu_worker.py:114] libiomp is not found in LD_PRELOAD.\n"
                   "WARNING Attempted to load weight x with dtype torch.float32 into parameter with dtype torch.bfloat16\n"
                   "ERROR the rendezvous timed out\n")
    assert console.problems([log]) == ["ERROR the rendezvous timed out"]
    assert console.problems([log], {log: log.stat().st_size}) == []
