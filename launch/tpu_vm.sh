#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker; jax.distributed finds the others
# from the TPU metadata (one process per worker, all of its chips).
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
# Expects: the repository checked out as ~/panns_jax and `pip install -e . "jax[tpu]"` done on
# every worker; WORKDIR and the TFDS data dir (--config.data_dir=...) on a filesystem that every
# worker mounts at the same path (e.g. a Filestore/NFS share; gs:// paths are not supported).
# If a worker dies, the others exit within --heartbeat_timeout_s (100 s); rerunning resumes.
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
printf -v ARGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/panns_jax && python -m panns_jax.main --multihost --config=$(printf %q "$CONFIG") \
--workdir=$(printf %q "$WORKDIR")${ARGS}"
