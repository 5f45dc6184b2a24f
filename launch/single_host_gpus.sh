#!/usr/bin/env bash
# One machine, several GPUs: one process drives all local GPUs (data parallel over the mesh).
#   launch/single_host_gpus.sh CONFIG WORKDIR [extra flags...]
# Expects: jax with CUDA (pip install -U "jax[cuda12]"), the package installed, AudioSet
# prepared in TFDS_DATA_DIR (see README, Data). The global batch (config.batch_size, x2 with
# mixup) must divide by the GPU count; --config.compute_dtype=bfloat16 for speed.
set -euo pipefail
CONFIG=${1:?config file, e.g. configs/cnn14.py}
WORKDIR=${2:?work directory}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m panns_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  ${TFDS_DATA_DIR:+--config.data_dir="$TFDS_DATA_DIR"} "$@"
