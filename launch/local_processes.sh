#!/usr/bin/env bash
# Several processes on this machine, as several hosts would run (what tests/test_multihost.py
# checks): N processes x D forced CPU devices, coordinated on 127.0.0.1.
#   launch/local_processes.sh [N=2] [D=2] [CONFIG=configs/demo.py] [WORKDIR] [extra flags...]
# Each process logs to WORKDIR.I.log; the exit status is the first failing process's.
set -euo pipefail
N=${1:-2}; D=${2:-2}; CONFIG=${3:-configs/demo.py}
WORKDIR=${4:-workdir/$(basename "${CONFIG%%.py*}")_${N}x${D}}
shift $(( $# > 4 ? 4 : $# )) || true
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D"
export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$PORT"
mkdir -p "$(dirname "$WORKDIR")"
pids=()
for ((i = 0; i < N; i++)); do
  python -m panns_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    > "$WORKDIR.$i.log" 2>&1 &
  pids+=($!)
done
set +e
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; code=$?
  if [ "$status" -eq 0 ]; then status=$code; fi
done
tail -n 2 "$WORKDIR.0.log"
exit "$status"
