"""Datasets for panns_jax: TFDS builders and the tf.data training pipeline.

The builders register with TFDS under the names `audioset`, `esc50`, `gtzan_genres`,
`ravdess`, `dcase2019_task1`, `dcase2018_task2`, `msos` and `panns_demo` once their module is
imported: `import panns_jax.data.builders` registers all of them, and so does using any name
below, or `get_builder`. Their configs
are '32k' (the default), '16k' and '8k', and panns_demo's are 'default' (2 s) and '10s'.
All write ArrayRecord files in source order, with the features `audio` (int16 [samples]),
`labels` (multi-label ids) or `label` (ClassLabel), `audio_id` (str), and `fold` where the
set has folds (the transfer sets with published 'train' and 'test' splits have none).

The modules have one job each:

* `sources`: random access to a split's records;
* `records`: decoding stored records;
* `sampling`: the stateless samplers and the record selection, in numpy only;
* `pipeline`: the tf.data iterators;
* `common` and the builder modules: writing the datasets.

This package imports none of them until one of its names is used, so
`panns_jax.data.sampling` imports without TensorFlow, and no submodule's import runs
into a half-initialised package.
"""

from __future__ import annotations

import importlib
from typing import Any, List

# Public name -> (submodule, name there).
_EXPORTS = {
    "Audioset": ("audioset", "Audioset"),
    "DEFAULT_MAX_BAD_FRACTION": ("common", "DEFAULT_MAX_BAD_FRACTION"),
    "BadExample": ("common", "BadExample"),
    "ExampleIndex": ("common", "ExampleIndex"),
    "TooManyBadExamplesError": ("common", "TooManyBadExamplesError"),
    "audioset_classes": ("panns_jax.audio", "audioset_classes"),
    "DEMO_CLASS_NAMES": ("panns_demo", "CLASS_NAMES"),
    "PannsDemo": ("panns_demo", "PannsDemo"),
    "Esc50": ("transfer", "Esc50"),
    "GtzanGenres": ("transfer", "GtzanGenres"),
    "Ravdess": ("transfer", "Ravdess"),
    "Dcase2019Task1": ("transfer", "Dcase2019Task1"),
    "Dcase2018Task2": ("transfer", "Dcase2018Task2"),
    "Msos": ("transfer", "Msos"),
    "Source": ("sources", "Source"),
    "ArraySource": ("sources", "ArraySource"),
    "TfdsSource": ("sources", "TfdsSource"),
    "get_builder": ("sources", "get_builder"),
    "make_source": ("sources", "make_source"),
    "TrainIterator": ("pipeline", "TrainIterator"),
    "EvalIterable": ("pipeline", "EvalIterable"),
    "make_train_iterator": ("pipeline", "make_train_iterator"),
    "make_eval_iterator": ("pipeline", "make_eval_iterator"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports the submodule that defines `name` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    module = module if "." in module else f"{__name__}.{module}"
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # Later lookups skip this function.
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
