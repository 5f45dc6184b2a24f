"""A training run's input: the config's dataset found, its folds checked, its iterators made.

The loop (:mod:`panns_jax.train`) calls :func:`make_inputs` once. Every problem with the data a
config names (an unknown dataset, a set not yet built, folds the split lacks) is a one-line
:class:`panns_jax.recipe.ConfigError` before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from panns_jax import recipe
from panns_jax.data import pipeline, sampling, sources
from panns_jax.recipe import ConfigError

# Above this length, a builder's manual-download instructions are replaced by a pointer.
_MAX_INSTRUCTIONS = 400


@dataclasses.dataclass
class Inputs:
    """The train iterator, the eval batches and the class names (None when the data has none)."""

    train: pipeline.TrainIterator
    eval: pipeline.EvalIterable
    class_names: Optional[Sequence[str]]


def get_builder(config: ml_collections.ConfigDict) -> Any:
    """The TFDS builder of ``config.dataset``.

    An unknown name, a sample-rate config the builder lacks and a set that needs a manual
    download not yet made are each a one-line ConfigError.
    """
    import tensorflow_datasets as tfds

    try:
        return sources.get_builder(config.dataset, data_dir=config.get("data_dir"))
    except tfds.core.registered.DatasetNotFoundError as err:  # Its text lists every name.
        raise ConfigError(
            f"config.dataset {config.dataset!r}: {str(err).splitlines()[0]}"
        ) from None
    except FileNotFoundError as err:  # Not built: the builder says how to build it.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        text = " ".join(lines)
        if len(text) > _MAX_INSTRUCTIONS:
            text = lines[0].rstrip(":") + " (see MANUAL_DOWNLOAD_INSTRUCTIONS in panns_jax/data/)"
        raise ConfigError(f"config.dataset {config.dataset!r}: {text}") from None
    except ValueError as err:  # TFDS: e.g. "BuilderConfig 64k not found with version 1.0.0".
        found = re.search(r"BuilderConfig \S+ not found( with version [\d.]*\d)?", str(err))
        if not found:
            raise
        raise ConfigError(
            f"config.dataset {config.dataset!r}: {found.group(0).strip()} "
            "(panns_jax builders have 32k, 16k, 8k)"
        ) from None


def check_folds(source: Any, folds: Optional[Any], key: str, split: str) -> None:
    """Refuse folds the split does not have (ESC-50 has 1..5), instead of selecting nothing."""
    if folds is None:
        return
    columns = getattr(getattr(source, "index", None), "columns", {}) or {}
    if "fold" not in columns:
        raise ConfigError(
            f"config.{key}={tuple(folds)} but split {split!r} has no folds: unset config.{key}"
        )
    present = sorted({int(f) for f in np.unique(columns["fold"])})
    missing = sorted(set(int(f) for f in folds) - set(present))
    if missing:
        raise ConfigError(
            f"config.{key}: fold(s) {missing} not in split {split!r}, whose folds are {present}"
        )


def _class_names(builder: Any) -> Optional[Sequence[str]]:
    """The class names of a builder's label feature.

    Multi-label sets store ``labels`` (a Sequence of ClassLabel), the single-label transfer
    sets ``label``. A FeaturesDict has ``in`` and ``[]`` but no ``.get``.
    """
    features = builder.info.features
    key = next((k for k in ("labels", "label") if k in features), None)
    labels = features[key] if key else None
    return getattr(getattr(labels, "feature", labels), "names", None)


def _split_sources(config: ml_collections.ConfigDict, given: Optional[Mapping[str, Any]]) -> tuple:
    """``({split: Source}, class names)`` from in-memory ``given`` sources or the TFDS set."""
    splits = {config.train_split, config.eval_split}
    if given is not None:
        missing = splits - set(given)
        if missing:
            raise ValueError(f"sources has no split {sorted(missing)} (it has {sorted(given)})")
        # A caller may name the classes on the source, as the fine-tuning notebook does.
        return dict(given), getattr(given[config.train_split], "class_names", None)
    builder = get_builder(config)
    # One Source per split: transfer configs train and evaluate folds of one split.
    return {split: sources.make_source(builder, split) for split in splits}, _class_names(builder)


def make_inputs(
    config: ml_collections.ConfigDict,
    sample_rate: int,
    given: Optional[Mapping[str, Any]] = None,
) -> Inputs:
    """The train iterator and eval batches of ``config`` at ``sample_rate``.

    ``given`` (``{split name: Source}``, e.g. an ``ArraySource``) replaces ``config.dataset``
    by in-memory data, as tests and notebooks use it.
    """
    by_split, names = _split_sources(config, given)
    train_source, eval_source = by_split[config.train_split], by_split[config.eval_split]
    check_folds(train_source, config.get("train_folds"), "train_folds", config.train_split)
    check_folds(eval_source, config.get("eval_folds"), "eval_folds", config.eval_split)
    samples = recipe.clip_samples(config, sample_rate)
    try:
        train = pipeline.make_train_iterator(
            train_source,
            batch_size=recipe.examples_per_step(config),
            clip_samples=samples,
            balanced=config.balanced,
            seed=config.seed,
            folds=config.get("train_folds"),
            fraction=config.get("data_fraction", 1.0),
            clips_per_class=config.get("clips_per_class"),
            names=names,
        )
    except sampling.SelectionError as err:
        raise ConfigError(f"config.clips_per_class={config.clips_per_class}: {err}") from None
    evaluation = pipeline.make_eval_iterator(
        eval_source,
        batch_size=config.eval_batch_size,
        clip_samples=samples,
        folds=config.get("eval_folds"),
        segments=bool(config.get("eval_segments", False)),
    )
    return Inputs(train, evaluation, names)


def describe_shards(inputs: Inputs) -> str:
    """Which rows of each global batch, and which eval records, this process reads."""
    import jax

    train, records = inputs.train, np.unique(inputs.eval.records)
    return (
        f"process {jax.process_index()}/{jax.process_count()} reads rows {train.row_offset}.."
        f"{train.row_offset + train.batch_size - 1} of each global batch of "
        f"{train.global_batch_size} (sampled from {len(train.records)} examples) and eval "
        f"records {f'{records[0]}..{records[-1]}' if len(records) else 'none'} "
        f"({len(records)} of them)"
    )
