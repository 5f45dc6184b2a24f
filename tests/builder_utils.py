"""Building a TFDS builder of panns_jax from a manual download laid out by a test."""

from __future__ import annotations

import tensorflow_datasets as tfds


def prepare(builder_cls, data_dir, manual_dir, **kwargs):
    """``builder_cls`` in ``data_dir``, prepared from the files in ``manual_dir``."""
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder
