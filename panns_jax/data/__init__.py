"""Datasets for panns_jax: TFDS builders and the tf.data training pipeline.

Importing this package registers the builders with TFDS under the names
`audioset`, `esc50`, `gtzan_genres`, `ravdess` and `panns_demo` (configs
'32k' (default), '16k', '8k'; panns_demo: 'default' (2 s) and '10s').
All write ArrayRecord files, in source order, with the feature layout
`audio` (int16 [samples]), `labels` (multi-label ids) or `label` (ClassLabel),
`audio_id` (str), and `fold` where the set has folds.
"""

from panns_jax.data.audioset import Audioset
from panns_jax.data.common import (
    DEFAULT_MAX_BAD_FRACTION,
    BadExample,
    ExampleIndex,
    TooManyBadExamplesError,
    audioset_classes,
)
from panns_jax.data.panns_demo import CLASS_NAMES as DEMO_CLASS_NAMES
from panns_jax.data.panns_demo import PannsDemo
from panns_jax.data.pipeline import (
    ArraySource,  # Hides GPUs from TF first.
    EvalIterable,
    Source,
    TfdsSource,
    TrainIterator,
    get_builder,
    make_eval_iterator,
    make_source,
    make_train_iterator,
)
from panns_jax.data.transfer import Esc50, GtzanGenres, Ravdess
