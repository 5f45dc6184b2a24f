"""Process-wide allocator setting for training binaries (no TensorFlow, no JAX import)."""

from __future__ import annotations


def tune_malloc() -> bool:
    """Lets glibc keep freed memory for reuse instead of returning it to the OS.

    Every 10 s, 32-clip batch is a 41 MB allocation, above glibc's mmap threshold, so by
    default each one is a fresh mmap whose pages fault in one by one. On VMs that costs
    ~0.4 ms of CPU per clip, a third of the pipeline (benchmarks/input_pipeline.py).
    XLA:CPU's per-step buffers (1.5 GB for a Cnn14 step of 8 x 5 s clips, 9 GB for the
    paper's 32 x 10 s) are likewise mmapped and faulted in anew every step by default.
    Worker threads' arenas cannot hold blocks over 64 MB, and no finite threshold that
    mallopt accepts (an int) covers 9 GB.

    One arena and unbounded mmap/trim thresholds (-1 is SIZE_MAX to glibc) make all of
    these reuses of already-mapped heap memory, as tcmalloc and jemalloc (common under
    TF) do anyway. The 32 x 10 s step then takes 2.2 M fewer page faults and 7 s less
    system time (23.5 s instead of 28 s, benchmarks/train_step.py). The price is that
    the process keeps its peak memory.

    The setting is process-wide, hence for binaries only: ``python -m panns_jax.main``
    calls it unless ``--notune_malloc``, and the benchmarks call it. Library code never
    does. Returns False where glibc's mallopt is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        unbounded = -1  # mallopt takes an int; glibc reads it as size_t: SIZE_MAX.
        return bool(
            libc.mallopt(m_arena_max, 1)
            and libc.mallopt(m_mmap_threshold, unbounded)
            and libc.mallopt(m_trim_threshold, unbounded)
        )
    except (OSError, AttributeError):
        return False
