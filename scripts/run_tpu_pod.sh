#!/usr/bin/env bash
# Start the same command on every worker of a Cloud TPU VM slice, over gcloud ssh.
# jax.distributed finds the workers by itself (--distributed=on).
#
#   scripts/run_tpu_pod.sh TPU_NAME ZONE configs/g3m.py --workdir=/mnt/shared/runs/g3m \
#       --config.model.checkpoint=/mnt/shared/ckpts/init_1.78b --config.data.root=/mnt/shared/data
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
repo=${NXTP_REPO:-'~/nxtp_jax'}
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $repo && python -m nxtp_jax.main --distributed=on --config=$(printf '%q' "$config") $args"
