"""TensorFlow for the parts that need it (tf.data, SavedModel/LiteRT, HEAR), kept off GPUs.

JAX owns the accelerators: a TensorFlow that sees a GPU reserves most of its memory at
start-up. Every module of panns_jax that imports TensorFlow goes through here.
"""

from __future__ import annotations

from types import ModuleType


def import_tensorflow() -> ModuleType:
    """``tensorflow``, with GPUs hidden from it (a no-op once TF has initialised devices)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # Devices already initialised: keep them as they are.
        pass
    return tf
