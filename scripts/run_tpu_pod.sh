#!/usr/bin/env bash
# Start the same command on every worker of a Cloud TPU VM slice, over gcloud ssh.
# jax.distributed finds the workers by itself (--distributed=on).
#
#   scripts/run_tpu_pod.sh TPU_NAME ZONE configs/g3m.py --workdir=/mnt/shared/runs/g3m \
#       --config.model.checkpoint=/mnt/shared/ckpts/init_1.78b --config.data.root=/mnt/shared/data
#
# First, on this machine, the compile check (mode compile, docs/training.md) compiles the run for
# the slice's topology and stops here if it does not fit; it needs libtpu (pip install -e ".[tpu]")
# and the slice's type in NXTP_TOPOLOGY (e.g. v5p-64, v5litepod-16). NXTP_SKIP_COMPILE_CHECK=1 skips it.
#
# The repository must be at $NXTP_REPO (default ~/nxtp_jax) on every worker with nxtp_jax
# installed, and the workdir, data and checkpoints on a filesystem every worker mounts
# (Filestore/NFS or a gcsfuse mount).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG_FILE [--workdir=DIR] [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
shift 3
if [[ "${NXTP_SKIP_COMPILE_CHECK:-0}" != 1 ]]; then
  if [[ -z "${NXTP_TOPOLOGY:-}" ]]; then
    echo "set NXTP_TOPOLOGY to the slice's type (e.g. v5p-64) for the compile check, or NXTP_SKIP_COMPILE_CHECK=1" >&2
    exit 2
  fi
  check_dir=$(mktemp -d)
  # The run's own flags, then the check's: its report goes to a scratch directory, not the run's workdir.
  python -m nxtp_jax.main --config="$config" "$@" --config.mode=compile --config.compile.topology="$NXTP_TOPOLOGY" \
    --config.compile.programs=train --workdir="$check_dir"
  echo "compile check passed ($check_dir/compile_report.json); starting the run on $tpu"
fi
repo=${NXTP_REPO:-'~/nxtp_jax'}
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $repo && python -m nxtp_jax.main --distributed=on --config=$(printf '%q' "$config") $args"
