"""Train a PANN: ``python -m panns_jax.main --config=configs/cnn14.py --workdir=DIR``.

Variants are config arguments (``--config=configs/cnn14.py:mixup=wave,sr=16k``) and
any field can be overridden (``--config.batch_size=64``). Re-running with the same
workdir resumes from its newest intact checkpoint.

Multi-host: run the same command on every host with ``--multihost`` (the coordinator,
process count and ids come from SLURM, Open MPI, a Cloud TPU VM or
``JAX_COORDINATOR_ADDRESS``) or with explicit ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``. ``jax.distributed.initialize()`` runs first; a
process whose peer dies exits non-zero within ``--heartbeat_timeout_s``.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from panns_jax import recipe, tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize(): the coordinator, process count "
    "and id come from the cluster (SLURM, Open MPI, Cloud TPU VM, JAX_COORDINATOR_ADDRESS) "
    "unless given by the flags below.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0's coordinator service, the same on "
    "every process (implies --multihost).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (>= 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0 .. num_processes-1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids",
    None,
    "Local accelerators this process drives, e.g. 0,1 (default: "
    "all; JAX picks one per process under SLURM/Open MPI on GPUs).",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "A process silent this long counts as dead; the others then "
    "exit with an error instead of waiting forever.",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout_s", 300, "How long to wait for every process to join."
)
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc",
    True,
    "One glibc arena and unbounded mmap/trim thresholds (panns_jax.malloc), so XLA's "
    "multi-GB step buffers are reused instead of faulted in every step; the process "
    "keeps its peak memory.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Keep orbax's per-save INFO chatter out of the progress log."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _distributed_args() -> dict:
    """jax.distributed.initialize's arguments from the flags (None: the cluster's), or {}
    when this is a single-process run. Bad values are one ``error:`` line."""
    explicit = [
        f
        for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICE_IDS)
        if f.value is not None
    ]
    if not (_MULTIHOST.value or explicit or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return {}
    address, count, rank = _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        _fail(f"--coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    if count is not None and count < 1:
        _fail(f"--num_processes={count} must be >= 1")
    if rank is not None and (rank < 0 or (count is not None and rank >= count)):
        _fail(f"--process_id={rank} must be in 0..{(count or 1) - 1} (--num_processes={count})")
    try:
        devices = (
            [int(d) for d in _LOCAL_DEVICE_IDS.value]
            if _LOCAL_DEVICE_IDS.value is not None
            else None
        )
    except ValueError:
        _fail(f"--local_device_ids={','.join(_LOCAL_DEVICE_IDS.value)} must be integers, e.g. 0,1")
    for flag in (_HEARTBEAT, _INIT_TIMEOUT):
        if flag.value < 1:
            _fail(f"--{flag.name}={flag.value} must be >= 1 (seconds)")
    return dict(
        coordinator_address=address,
        num_processes=count,
        process_id=rank,
        local_device_ids=devices,
        initialization_timeout=_INIT_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
    )


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Fail with one line if process 0's coordinator cannot be reached within ``timeout_s``
    (JAX would abort with a stack trace saying another task died)."""
    import socket
    import time

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                _fail(
                    f"cannot reach the coordinator at {address} within "
                    f"--distributed_init_timeout_s={timeout_s} ({err.strerror or err}): "
                    "start process 0 with the same --coordinator_address, and check that "
                    "this host can reach it",
                    1,
                )
            time.sleep(1)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def main(argv: Sequence[str]) -> None:
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _TUNE_MALLOC.value:  # Process-wide: a binary's decision, never the library's.
        from panns_jax import malloc

        malloc.tune_malloc()
    distributed = _distributed_args()
    if distributed:
        if distributed["coordinator_address"] and distributed["process_id"]:
            _wait_for_coordinator(distributed["coordinator_address"], _INIT_TIMEOUT.value)
        try:
            jax.distributed.initialize(**distributed)
            jax.devices()  # Joins the other processes' device topology (a rendezvous).
        except Exception as err:  # Timeouts, unreachable coordinator, missing cluster env.
            _fail(
                f"jax.distributed.initialize failed ({_first_line(err)}): start every "
                "process, with the same --coordinator_address (reachable from all hosts) "
                "and --num_processes, and distinct --process_id; or pass --multihost "
                "inside a SLURM / Open MPI / Cloud TPU job",
                1,
            )
    from panns_jax import train  # After initialisation: it creates the mesh over all hosts.

    index, count = jax.process_index(), jax.process_count()
    logging.info(
        "JAX %s, process %d/%d, %d local / %d global devices (%s)",
        jax.__version__,
        index,
        count,
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    try:
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except recipe.ConfigError as err:  # A refused config: one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        if count > 1:
            _exit_now(2)
        raise SystemExit(2) from None
    except Exception as err:
        if count == 1:
            raise
        # Multi-host: say which process failed and leave at once. A normal exit would wait
        # in jax.distributed's shutdown barrier for the peers, which wait in the next
        # collective for this process: the job would hang until a timeout.
        logging.exception("process %d/%d failed", index, count)
        print(
            f"error: process {index} of {count} stopped: {_first_line(err)}. If another "
            "process died first, its log has the cause; the others stop within "
            f"--heartbeat_timeout_s={_HEARTBEAT.value}",
            file=sys.stderr,
        )
        _exit_now(1)
    if result and index == 0:  # The task's own summary (accuracy first for single-label).
        summary = tasks.get(_CONFIG.value.get("task")).summary(result)
        logging.info("final eval: %s", summary)
        print(f"final eval {summary}")


def _exit_now(code: int) -> None:
    """Flush and leave without interpreter shutdown (see main's multi-host error path)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=recipe.parse_flags)
