"""Every value of a training config checked before anything is compiled, loaded or written.

:func:`validate_config` raises :class:`panns_jax.recipe.ConfigError` with one line that names
the field, its value and what it must be. The binaries print that line and exit with status 2.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, List, Optional, Tuple

import jax
import ml_collections
import numpy as np

from panns_jax import checks, fileio, model_builder, models, recipe, tasks
from panns_jax.recipe import ConfigError

Rule = Tuple[str, Callable[[Any], bool], str]  # (field, test of its value, what it must be)


def _positive_int(value: Any) -> bool:
    return checks.is_integer(value) and value >= 1


def _finite_positive(value: Any) -> bool:
    return checks.is_real(value) and np.isfinite(value) and value > 0


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _field_rules(config: ml_collections.ConfigDict) -> List[Rule]:
    """The rule of every scalar field; some depend on the config or on the devices present."""
    devices = jax.device_count()
    rules: List[Rule] = [
        ("task", _optional(lambda v: v in tasks.TASKS), f"one of {sorted(tasks.TASKS)}"),
        ("mixup", lambda v: v in ("none", "logmel", "wave"), "'none', 'logmel' or 'wave'"),
    ]
    if config.get("mixup") != "none":
        rules.append(("mixup_alpha", _finite_positive, "a finite number > 0"))
    rules += [
        ("batch_size", _positive_int, "an integer >= 1 (clips per training step)"),
        ("eval_batch_size", _positive_int, "an integer >= 1"),
        ("num_train_steps", _positive_int, "an integer >= 1"),
        ("checkpoint_every", _positive_int, "an integer >= 1 (steps between checkpoints)"),
        ("log_every", _positive_int, "an integer >= 1 (steps between log lines)"),
        (
            "eval_every",
            lambda v: checks.is_integer(v) and v >= 0,
            "an integer >= 0 (steps between evaluations; 0: only at the end)",
        ),
        ("keep_checkpoints", _optional(_positive_int), "an integer >= 1"),
        ("clip_seconds", _finite_positive, "a finite number of seconds > 0"),
        ("learning_rate", _finite_positive, "a finite number > 0"),
        ("b1", lambda v: checks.is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("b2", lambda v: checks.is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("eps", _finite_positive, "a finite number > 0"),
        (
            "grad_clip_norm",
            _optional(_finite_positive),
            "None (no clipping) or a finite number > 0",
        ),
        (
            "data_fraction",
            _optional(lambda v: checks.is_real(v) and 0 < v <= 1),
            "a number in (0, 1]",
        ),
        (
            "clips_per_class",
            _optional(_positive_int),
            "None (all clips) or an integer >= 1",
        ),
        ("eval_segments", lambda v: isinstance(v, bool), "True or False"),
        (
            "compute_dtype",
            _optional(lambda v: v in checks.COMPUTE_DTYPES),
            "'float32' or 'bfloat16'",
        ),
        (
            "conv_backend",
            _optional(lambda v: v in models.CONV_BACKENDS),
            " or ".join(repr(b) for b in models.CONV_BACKENDS),
        ),
        ("seed", checks.is_integer, "an integer"),
        (
            "num_devices",
            _optional(lambda v: _positive_int(v) and v <= devices),
            f"None (all) or an integer in 1..{devices} (the devices there are)",
        ),
        ("fsdp_min_size", _optional(_positive_int), "None (no FSDP) or an integer >= 1"),
    ]
    return rules


def _check_fields(config: ml_collections.ConfigDict) -> None:
    for key, test, must in _field_rules(config):
        value = config.get(key)
        try:
            good = bool(test(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"config.{key} must be {must}, got {value!r}")


def _check_model_name(config: ml_collections.ConfigDict) -> None:
    name = config.get("model")
    if not isinstance(name, str) or name not in models.names():
        close = difflib.get_close_matches(str(name), models.names(), n=3)
        raise ConfigError(
            f"config.model {name!r} is not a registered model"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; panns_jax.models.names() lists them"
        )


def _check_model_fits(config: ml_collections.ConfigDict) -> Any:
    """The overrides fit the model, and the model builder's own fields are valid; the
    module the config names."""
    try:  # Cheap: builds the module without tracing, so unknown overrides fail here.
        module = models.get(config.model, **dict(config.get("model_overrides") or {}))
    except (TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config.model_overrides do not fit {config.model}: {reason}") from None
    model_builder.for_config(config).validate()
    return module


# Every registered model takes clips of 1 s and more (Res1dNet31/51 need 1 s; the others
# 0.5 s): shorter clips are traced abstractly to find out, longer ones cost nothing.
SAFE_CLIP_SECONDS = 1.0


def check_clip_fits(module: Any, seconds: float, what: str, name: str) -> None:
    """ConfigError, naming ``what``, when clips of ``seconds`` are too short for the pooling
    of ``module`` (architecture ``name``): its layers would reduce time to nothing."""
    if seconds >= SAFE_CLIP_SECONDS:
        return
    samples = max(1, int(round(seconds * models.sample_rate(module))))
    if not models.takes_length(module, samples):
        raise ConfigError(
            f"{what}: clips of {seconds:g} s are too short for {name}'s pooling; use at "
            f"least {SAFE_CLIP_SECONDS:g} s"
        )


def _check_fold_fields(config: ml_collections.ConfigDict) -> None:
    """``train_folds`` / ``eval_folds``: non-empty lists of fold numbers within the set's folds."""
    transfer = config.get("transfer")
    num_folds = transfer.get("num_folds") if transfer is not None else None
    for key in ("train_folds", "eval_folds"):
        folds = config.get(key)
        if folds is None:
            continue
        if (
            isinstance(folds, (str, bytes))
            or not hasattr(folds, "__len__")
            or not folds
            or not all(checks.is_integer(f) for f in folds)
        ):
            raise ConfigError(
                f"config.{key} must be a non-empty list of fold numbers, got {folds!r}"
            )
        if num_folds and not all(1 <= f <= num_folds for f in folds):
            raise ConfigError(f"config.{key} must hold folds in 1..{num_folds}, got {tuple(folds)}")


def _check_batch_divides(config: ml_collections.ConfigDict) -> None:
    """The clips of a step split evenly over the devices (2 per pair under mixup)."""
    devices = config.get("num_devices") or jax.device_count()
    clips = recipe.examples_per_step(config)
    if clips % devices:
        per_row = clips // config.batch_size
        raise ConfigError(
            f"config.batch_size {config.batch_size} ({clips} clips per "
            f"step) must divide over the {devices} devices: use a multiple of "
            f"{devices // np.gcd(devices, per_row)}"
        )


def writable_dir_problem(workdir: str) -> Optional[str]:
    """Why ``workdir`` cannot hold a run, or None if it can.

    It fails when a file stands in its place, or when no file can be created in it or in its
    first existing ancestor.
    """
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is" if probe == path else f"is below {probe}, which is"
        return f"{workdir} {where} a file, not a directory: choose another --workdir"
    try:
        fileio.write_probe(probe)
    except OSError as err:
        return f"{workdir} cannot be written ({probe}: {err.strerror}): choose a writable --workdir"
    return None


def validate_config(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` for a config that cannot train, and for an unwritable workdir.

    Nothing is compiled, loaded or written. The model name is checked first, so that a
    misspelt name is the error a user sees.
    """
    _check_model_name(config)
    _check_fields(config)
    if not isinstance(config.get("dataset"), str) or not config.dataset:
        raise ConfigError(
            f"config.dataset must be a TFDS dataset name, got {config.get('dataset')!r}"
        )
    check_clip_fits(
        _check_model_fits(config),
        config.clip_seconds,
        f"config.clip_seconds={config.clip_seconds:g}",
        config.model,
    )
    _check_fold_fields(config)
    _check_batch_divides(config)
    if workdir is not None:
        problem = writable_dir_problem(workdir)
        if problem:
            raise ConfigError(problem)
