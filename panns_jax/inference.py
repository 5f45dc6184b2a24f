"""Compatibility names for code written before the split (issue #15); new code imports
:mod:`panns_jax.tagger` (AudioTagger and its chunk batcher), :mod:`panns_jax.sed`
(stitching, events, figures) and :mod:`panns_jax.cli` (the ``panns-jax`` command).

``python -m panns_jax.inference tag rec.wav`` still runs the command.
"""

from __future__ import annotations

import sys

import numpy as np

from panns_jax.cli import (
    PRETRAINED_DEFAULT,
    build_parser,
    check_arguments,
    check_outputs,
    expand_inputs,
    main,
    resolve_weights,
)
from panns_jax.sed import (
    SedResult,
    check_threshold,
    detect_events,
    plot_sed,
    sed_figure,
    stitch_framewise,
)
from panns_jax.sed import streamed_logmel as _streamed_logmel
from panns_jax.tagger import (
    DEFAULT_SED_HOP_S,
    DEFAULT_SED_WINDOW_S,
    DEFAULT_WINDOW_S,
    MAX_BATCH_SIZE,
    MIN_HOP_S,
    AudioTagger,
    ChunkedOutput,
    Source,
    aggregate_chunks,
    check_batch_size,
    check_top_k,
    chunk_embeddings,
    load_tagger,
)

__all__ = [
    "DEFAULT_SED_HOP_S",
    "DEFAULT_SED_WINDOW_S",
    "DEFAULT_WINDOW_S",
    "MAX_BATCH_SIZE",
    "MIN_HOP_S",
    "PRETRAINED_DEFAULT",
    "AudioTagger",
    "ChunkedOutput",
    "SedResult",
    "Source",
    "aggregate_chunks",
    "build_parser",
    "check_arguments",
    "check_batch_size",
    "check_outputs",
    "check_threshold",
    "check_top_k",
    "chunk_embeddings",
    "detect_events",
    "expand_inputs",
    "load_tagger",
    "main",
    "plot_sed",
    "resolve_weights",
    "sed_figure",
    "stitch_framewise",
    "streamed_logmel",
]


def streamed_logmel(tagger: AudioTagger, source: Source, block_s: float = 60.0) -> np.ndarray:
    """The old signature of :func:`panns_jax.sed.streamed_logmel` (rate and front end of
    ``tagger``)."""
    return _streamed_logmel(source, tagger.sample_rate, tagger.model.frontend, block_s)


if __name__ == "__main__":
    sys.exit(main())
