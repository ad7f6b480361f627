#!/usr/bin/env bash
# Submit launch/slurm.sbatch: multi-node CUDA, one process per node (see slurm.sbatch for why).
#
#   launch/slurm_submit.sh --nodes N --gpus-per-node G [--partition P] [--account A]
#                          [--time HH:MM:SS] [--venv DIR] [--port PORT] [--logs DIR]
#                          [--dry-run] -- --config X.yaml [key=value ...]
#
# The config's mesh must cover N*G devices (e.g. mesh.fsdp=-1). --dry-run prints the sbatch
# command and the srun command the job would run.
set -euo pipefail

die() { echo "slurm_submit.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
# Print a command with shell quoting (copy-pastable).
quote() { if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
print_cmd() { local a out=(); for a in "$@"; do out+=("$(quote "$a")"); done; echo "${out[*]}"; }
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

NODES="" GPUS="" PARTITION="" ACCOUNT="" TIME="" VENV="" PORT=12345 LOGS="$REPO/runs/slurm_logs" DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="${2-}"; shift 2 || die "--nodes needs a value" ;;
    --gpus-per-node) GPUS="${2-}"; shift 2 || die "--gpus-per-node needs a value" ;;
    --partition) PARTITION="${2-}"; shift 2 || die "--partition needs a value" ;;
    --account) ACCOUNT="${2-}"; shift 2 || die "--account needs a value" ;;
    --time) TIME="${2-}"; shift 2 || die "--time needs a value" ;;
    --venv) VENV="${2-}"; shift 2 || die "--venv needs a value" ;;
    --port) PORT="${2-}"; shift 2 || die "--port needs a value" ;;
    --logs) LOGS="${2-}"; shift 2 || die "--logs needs a value" ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training arguments go after --)" ;;
  esac
done
TRAIN_ARGS=("$@")

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES': expected a positive integer"
[[ "$GPUS" =~ ^[1-9][0-9]*$ && "$GPUS" -le 16 ]] || die "--gpus-per-node '$GPUS': expected 1..16"
[[ -z "$TIME" || "$TIME" =~ ^([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}$ ]] || die "--time '$TIME': expected HH:MM:SS or D-HH:MM:SS"
[[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1024 && "$PORT" -le 65535 ]] || die "--port '$PORT': expected 1024..65535"
[[ -z "$VENV" || -f "$VENV/bin/activate" ]] || die "--venv '$VENV': no bin/activate there"
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: add '-- --config FILE.yaml [key=value ...]'"
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
  if [[ "${TRAIN_ARGS[$i]}" == --config ]]; then
    cfg="${TRAIN_ARGS[$((i + 1))]-}"
    [[ -f "$cfg" || -f "$REPO/$cfg" ]] || die "--config '$cfg': no such file"
  fi
done

SB=(sbatch --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node=1 --output="$LOGS/%x-%j.out"
    --export="ALL,TOPD_REPO=$REPO,TOPD_LOGS=$LOGS,TOPD_COORDINATOR_PORT=$PORT${VENV:+,TOPD_VENV=$VENV}")
[[ -n "$PARTITION" ]] && SB+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && SB+=(--account="$ACCOUNT")
[[ -n "$TIME" ]] && SB+=(--time="$TIME")
SB+=("$HERE/slurm.sbatch" "${TRAIN_ARGS[@]}")

if [[ $DRY == 1 ]]; then
  print_cmd "${SB[@]}"
  echo "# the job then runs on each of the $NODES nodes ($((NODES * GPUS)) GPUs in all):"
  TOPD_REPO="$REPO" TOPD_LOGS="$LOGS" TOPD_COORDINATOR_PORT="$PORT" TOPD_VENV="$VENV" \
    "$HERE/slurm.sbatch" --dry-run "${TRAIN_ARGS[@]}"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found (run this on a SLURM login node, or use --dry-run)"
mkdir -p "$LOGS"
"${SB[@]}"
