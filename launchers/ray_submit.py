#!/usr/bin/env python3
"""Submit the sa-sft pipeline, or one stage, to a running Ray cluster as a Ray job.

    python launchers/ray_submit.py [--address http://HEAD:8265] [--stage run] CONFIG [key=value ...]

The config (a built-in name or a YAML file) is validated here first, so a typo fails in a second
instead of on the cluster. A YAML file travels to the cluster in the job's runtime environment
(its working_dir holds just that file); the job then runs, from --cwd,

    python -m sa_sft.cli STAGE config.yaml [key=value ...] train.launcher=ray

so generation spreads its vLLM engines over the cluster and training places one Ray actor per
rank (train.launcher=ray) in a placement group. --cwd (default: here) must exist on the cluster
with the same contents, usually a shared filesystem, so that relative paths in the config
(output_dir, data.task_path) mean the same there. sa-sft must be installed in the cluster's
Python environment (the one `python` resolves to on the head node).

Token authentication: with RAY_AUTH_MODE=token set on the cluster, export the same
RAY_AUTH_MODE and RAY_AUTH_TOKEN here. Waits for the job and streams its logs unless --no-wait;
the exit code is 0 only when the job succeeded.
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sa_sft.pipeline.stages import STAGES  # light: names and help only

COMMANDS = ("run", *(spec.name for spec in STAGES if spec.ray_job))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", metavar="CONFIG", help="built-in config name or YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS")
                        or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="the cluster's job API (dashboard) address (default: $RAY_API_SERVER_ADDRESS, "
                             "$RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--stage", choices=COMMANDS, default="run", help="what to run (default: the whole pipeline)")
    parser.add_argument("--cwd", default=os.getcwd(), help="the job's working directory on the cluster")
    parser.add_argument("--python", default="python", help="the cluster's Python with sa-sft installed")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--timeout", type=float, default=0, help="give up waiting after this many seconds (0: never)")
    return parser.parse_args(argv)


def entrypoint(args, shipped_config: bool) -> str:
    overrides = list(args.overrides)
    if not any(o.startswith("train.launcher=") for o in overrides):
        overrides.append("train.launcher=ray")
    # The job starts in the unpacked working_dir, where config.yaml is; relative paths resolve from --cwd.
    config = '"$config"' if shipped_config else shlex.quote(args.config)
    command = " ".join([shlex.quote(args.python), "-m", "sa_sft.cli", args.stage, config,
                        *map(shlex.quote, overrides)])
    return f'config="$PWD/config.yaml"; cd {shlex.quote(args.cwd)} && exec {command}'


def wait_for(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    printed, deadline = 0, time.time() + timeout if timeout else None
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if deadline and time.time() > deadline:
            return "TIMEOUT"
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sa_sft.config import load_config
    from sa_sft.errors import UserError

    try:
        load_config(args.config, args.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="sa_sft_job_") as working_dir:
        # A built-in name needs nothing shipped: it is part of the package installed on the cluster.
        shipped = Path(args.config).is_file()
        if shipped:
            shutil.copyfile(args.config, Path(working_dir) / "config.yaml")
        try:
            client = JobSubmissionClient(args.address)
            job_id = client.submit_job(entrypoint=entrypoint(args, shipped),
                                       submission_id=f"sa-sft-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                                       runtime_env={"working_dir": working_dir},
                                       metadata={"sa_sft_config": args.config, "sa_sft_stage": args.stage})
        except Exception as e:  # the client raises bare exceptions for unreachable clusters and auth failures
            print(f"error: cannot submit to the Ray cluster at {args.address}: {str(e).splitlines()[0]}",
                  file=sys.stderr)
            return 2
    print(f"submitted Ray job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {job_id}")
        return 0
    try:
        status = wait_for(client, job_id, args.timeout)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the job keeps running. Stop it with: ray job stop --address {args.address} {job_id}",
              file=sys.stderr)
        return 130
    print(f"Ray job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
