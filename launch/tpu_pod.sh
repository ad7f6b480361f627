#!/usr/bin/env bash
# Run `python -m topd_jax.train ...` on every worker of a Cloud TPU VM (pod slice).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator v5p-64 --create [--version V]]
#                     [--project P] [--logs DIR] [--dry-run] -- --config X.yaml [key=value ...]
#
# Steps: create the TPU VM (--create) or check that it exists; copy this checkout (git archive
# of HEAD) to all workers and pip-install it with jax[tpu]; run the same training command on
# --worker=all (each worker's JAX finds the pod itself: TOPD_DISTRIBUTED=auto ->
# jax.distributed.initialize()); copy every worker's log back to --logs (default
# runs/tpu_logs/NAME). --dry-run prints the commands instead of running them.
set -euo pipefail

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CREATE=0 DRY=0 LOGS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2-}"; shift 2 || die "--name needs a value" ;;
    --zone) ZONE="${2-}"; shift 2 || die "--zone needs a value" ;;
    --accelerator) ACCEL="${2-}"; shift 2 || die "--accelerator needs a value" ;;
    --version) VERSION="${2-}"; shift 2 || die "--version needs a value" ;;
    --project) PROJECT="${2-}"; shift 2 || die "--project needs a value" ;;
    --logs) LOGS="${2-}"; shift 2 || die "--logs needs a value" ;;
    --create) CREATE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training arguments go after --)" ;;
  esac
done
TRAIN_ARGS=("$@")

[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lower-case letters, digits and '-', starting with a letter"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE': expected a GCP zone such as us-east5-a"
if [[ $CREATE == 1 ]]; then
  [[ "$ACCEL" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator '$ACCEL': expected a TPU type such as v5p-64, v4-32, v5litepod-16 (needed with --create)"
  [[ -n "$VERSION" ]] || case "$ACCEL" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "--version: no default runtime for '$ACCEL'; give one" ;;
  esac
elif [[ -n "$ACCEL$VERSION" ]]; then
  die "--accelerator/--version only apply with --create"
fi
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: add '-- --config FILE.yaml [key=value ...]'"
LOGS="${LOGS:-runs/tpu_logs/$NAME}"

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
# --dry-run prints each command with shell quoting (copy-pastable).
quote() { if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
run() {
  if [[ $DRY == 1 ]]; then local a out=(); for a in "$@"; do out+=("$(quote "$a")"); done; echo "${out[*]}"
  else "$@"; fi
}

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="/tmp/topd_jax-$NAME.tar.gz"
REMOTE_DIR='$HOME/topd_jax'
TRAIN_CMD="python -m topd_jax.train"
for a in "${TRAIN_ARGS[@]}"; do TRAIN_CMD+=" $(quote "$a")"; done

if [[ $CREATE == 1 ]]; then
  run "${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCEL" --version "$VERSION"
else
  run "${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
fi
run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
run "${GC[@]}" scp "$TARBALL" "$NAME:topd_jax.tar.gz" "${WHERE[@]}" --worker=all
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command \
  "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf topd_jax.tar.gz -C $REMOTE_DIR && pip install -q -U 'jax[tpu]' -e $REMOTE_DIR"
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command \
  "set -o pipefail; cd $REMOTE_DIR && TOPD_DISTRIBUTED=auto $TRAIN_CMD 2>&1 | tee \$HOME/topd_train.log"
# Logs: one file per worker (workers are numbered 0..n-1 in the order describe lists them).
run mkdir -p "$LOGS"
if [[ $DRY == 1 ]]; then
  echo "# for each worker W in 0..n-1 (n from: ${GC[*]} describe $NAME ${WHERE[*]} --format='value(networkEndpoints)'):"
  run "${GC[@]}" scp "$NAME:topd_train.log" "$LOGS/worker-W.log" "${WHERE[@]}" --worker=W
else
  n=$("${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints)' | tr ';' '\n' | grep -c .)
  for ((w = 0; w < n; w++)); do
    run "${GC[@]}" scp "$NAME:topd_train.log" "$LOGS/worker-$w.log" "${WHERE[@]}" --worker="$w"
  done
  echo "logs of $n workers in $LOGS"
fi
