#!/usr/bin/env bash
# Quick local run on CPU: the demo config (or any config) in a few minutes.
#   launch/local_cpu.sh [CONFIG] [WORKDIR] [extra flags...]
# Expects: the package installed (pip install -e .), run from the project root.
set -euo pipefail
CONFIG=${1:-configs/demo.py}
WORKDIR=${2:-workdir/$(basename "${CONFIG%%.py*}")}
shift $(( $# > 2 ? 2 : $# )) || true
export JAX_PLATFORMS=cpu
exec python -m panns_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
