"""Every TFDS builder of panns_jax, registered with TFDS on import.

    import tensorflow_datasets as tfds
    import panns_jax.data.builders  # noqa: F401
    builder = tfds.builder("esc50/32k", data_dir=...)

``panns_jax.data`` itself imports no submodule until one of its names is used, so that its
numpy-only modules import without TensorFlow. This module is the one to import for the names
``audioset``, ``esc50``, ``gtzan_genres``, ``ravdess``, ``dcase2019_task1``, ``dcase2018_task2``,
``msos``, ``panns_demo`` and ``custom_audio`` (own data, configs made by
:func:`panns_jax.data.custom.register`).
"""

from __future__ import annotations

from panns_jax.data.audioset import Audioset
from panns_jax.data.custom import CustomAudio
from panns_jax.data.panns_demo import PannsDemo
from panns_jax.data.transfer import (
    Dcase2018Task2,
    Dcase2019Task1,
    Esc50,
    GtzanGenres,
    Msos,
    Ravdess,
)

BUILDERS = (
    Audioset,
    Esc50,
    GtzanGenres,
    Ravdess,
    Dcase2019Task1,
    Dcase2018Task2,
    Msos,
    PannsDemo,
    CustomAudio,
)
NAMES = tuple(builder.name for builder in BUILDERS)
