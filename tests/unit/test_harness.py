"""lm_eval:TASK suites: names checked against lm-eval's task index before any stage runs."""
import subprocess
import sys



def test_unknown_lm_eval_task_is_one_line_before_any_stage(tmp_path, lm_eval_overrides):
    overrides = lm_eval_overrides
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "run", "tiny", f"output_dir={out}", overrides[0],
                           "evaluate.suites=[lm_eval:tiny_sumz]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: evaluate.suites: lm_eval:tiny_sumz is not a task") and "tiny_sums" in last
    assert not out.exists()


def test_missing_include_path_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", "evaluate", "tiny", f"output_dir={tmp_path / 'run'}",
                           f"evaluate.lm_eval_include_path={tmp_path / 'nowhere'}", "evaluate.suites=[lm_eval:tiny_sums]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: config key evaluate.lm_eval_include_path: "
                                                    f"{tmp_path / 'nowhere'} is not a directory")
