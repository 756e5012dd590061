#!/usr/bin/env bash
# Submit generate -> train -> evaluate as three jobs chained with --dependency=afterok; prints the job ids.
#   slurm/submit_chain.sh [sbatch options for every job ...] -- CONFIG [key=value ...]
# e.g. slurm/submit_chain.sh --nodes=2 --partition=gpu -- my.yaml output_dir=/shared/runs/x
# A failed stage cancels the ones after it (--kill-on-invalid-dep); resubmitting the chain skips what finished.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
options=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do options+=("$1"); shift; done
if [ $# -eq 0 ] || [ $# -eq 1 ]; then
  echo "usage: $0 [sbatch options ...] -- CONFIG [key=value ...]" >&2
  exit 2
fi
shift
generate=$(sbatch --parsable "${options[@]}" "$here/generate.sbatch" "$@")
train=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency="afterok:${generate%%;*}" "${options[@]}" \
  "$here/train.sbatch" "$@")
evaluate=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency="afterok:${train%%;*}" "${options[@]}" \
  --nodes=1 "$here/evaluate.sbatch" "$@")
echo "generate ${generate%%;*}"
echo "train ${train%%;*}"
echo "evaluate ${evaluate%%;*}"
