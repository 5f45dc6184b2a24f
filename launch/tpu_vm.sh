#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker; jax.distributed finds the others.
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
# Expects: the repository checked out and `pip install -e . "jax[tpu]"` done on every worker,
# WORKDIR and the TFDS data dir on a GCS bucket (gs://...) or a shared disk.
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd panns_jax && python -m panns_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $*"
