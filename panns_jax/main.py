"""Train a PANN: ``python -m panns_jax.main --config=configs/cnn14.py --workdir=DIR``.

Variants are config arguments (``--config=configs/cnn14.py:mixup=wave,sr=16k``) and
any field can be overridden (``--config.batch_size=64``). Re-running with the same
workdir resumes from its latest checkpoint. Multi-host: pass ``--multihost`` (or
set JAX's coordinator environment) to call ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (SLURM, TPU VMs, ...).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Keep orbax's per-save INFO chatter out of the progress log."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def main(argv) -> None:
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _MULTIHOST.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    from panns_jax import train  # After initialisation: it creates the mesh over all hosts.

    logging.info("JAX %s, process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if result:
        logging.info("final eval: mAP %.4f  mAUC %.4f  d' %.3f", result["mAP"], result["mAUC"],
                     result["d_prime"])
        print(f"final eval mAP: {result['mAP']:.4f}  mAUC: {result['mAUC']:.4f}  "
              f"d-prime: {result['d_prime']:.3f}")


if __name__ == "__main__":
    app.run(main)
