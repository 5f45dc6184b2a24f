"""What processes of a multi-host run do together: meet, compile, agree and gather.

Every function is a no-op or a local computation in a single-process run. In a multi-process
run every process must call it at the same point, since each is a collective.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_BARRIERS = itertools.count()


def rendezvous(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here.

    The barrier is the coordination service's (through orbax's public helper), not a device
    collective, so a late process has ``timeout_s`` to arrive instead of gloo's 30 s.
    """
    if jax.process_count() == 1:
        return
    key = f"panns_jax/{next(_BARRIERS)}/{name}"  # Unique, and the same on every process.
    if ocp.multihost.is_jax_distributed_client_initialized():
        ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)
    else:
        multihost_utils.sync_global_devices(key)


def compile_everywhere(jitted: Any, name: str, *abstract_args: Any) -> Any:
    """``jitted`` compiled for ``abstract_args``, returned once every process has compiled it.

    Compile times differ between hosts (load, a compilation-cache hit on one only), and CPU
    collectives (gloo) give up when a peer joins their first use more than 30 s late.
    Compiling first and meeting at a barrier makes the first step start together.
    """
    compiled = jitted.lower(*abstract_args).compile()
    rendezvous(f"compiled {name}")
    return compiled


def all_processes(ok: bool) -> bool:
    """True where ``ok`` holds on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def broadcast_float(value: float) -> float:
    """Process 0's ``value`` on every process, bit for bit.

    The float64 travels as two uint32 words, since JAX without x64 would round it to float32.
    """
    if jax.process_count() == 1:
        return float(value)
    words = np.frombuffer(np.float64(value).tobytes(), np.uint32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)
    return float(np.frombuffer(words.tobytes(), np.float64)[0])


def to_host(tree: Any) -> Any:
    """numpy copies of the global arrays of ``tree``.

    Fully replicated or process-local arrays are copied locally. Arrays sharded across hosts
    (FSDP) are gathered, which is a collective. The shardings, hence the branch, are the same
    on every process.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if all(
        getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", True)
        for x in leaves
    ):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
