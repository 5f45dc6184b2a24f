"""PyTorch PANNs state_dict <-> panns_jax variables: the one place that knows both.

Our submodules carry the original module paths as names, so one rule maps every
architecture (``golden/README.md``, "Layouts"):

==========================  ================================  =====================
flax leaf                   state_dict key                    layout change
==========================  ================================  =====================
params/<path>/kernel (4-D)  <path>.weight (out, in/g, kh, kw)  transpose(3, 2, 0, 1)
params/<path>/kernel (3-D)  <path>.weight (out, in, k)         transpose(2, 1, 0)
params/<path>/kernel (2-D)  <path>.weight (out, in)            transpose
params/<path>/bias          <path>.bias                        -
params/<path>/scale (BN)    <path>.weight                      -
batch_stats/<path>/mean     <path>.running_mean                -
batch_stats/<path>/var      <path>.running_var                 -
(every BN)                  <path>.num_batches_tracked         int64 scalar
(log-mel front end)         spectrogram_extractor.stft.conv_{real,imag}.weight,
                            logmel_extractor.melW              fixed, not parameters
==========================  ================================  =====================
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import flax
import jax
import numpy as np

from panns_jax import frontend as fe
from panns_jax import models

FRONTEND_KEYS = (
    "spectrogram_extractor.stft.conv_real.weight",
    "spectrogram_extractor.stft.conv_imag.weight",
    "logmel_extractor.melW",
)

_LEAF_TO_SUFFIX = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the requested architecture."""


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    if kernel.ndim == 3:
        return kernel.transpose(2, 1, 0)
    return kernel.T


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    if weight.ndim == 3:
        return weight.transpose(2, 1, 0)
    return weight.T


def _torch_key(collection: str, path: Tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_LEAF_TO_SUFFIX[(collection, path[-1])],))


def uses_logmel(model: Any) -> bool:
    """Whether the original model owns STFT/mel front-end buffers."""
    return getattr(model, "uses_logmel", True)


def frontend_state(config: fe.FrontendConfig) -> Dict[str, np.ndarray]:
    """The original's fixed front-end tensors: DFT-as-conv kernels and the mel matrix.

    ``conv_real[k, 0, n] = hann[n] cos(2 pi k n / N)``, ``conv_imag = -hann[n] sin(...)``.
    """
    n_fft = config.window_size
    n = np.arange(n_fft, dtype=np.float64)
    k = np.arange(config.n_freq, dtype=np.float64)[:, None]
    window = fe.hann_window(n_fft).astype(np.float64)
    angle = 2.0 * np.pi * k * n / n_fft
    return {
        FRONTEND_KEYS[0]: (window * np.cos(angle)).astype(np.float32)[:, None, :],
        FRONTEND_KEYS[1]: (-window * np.sin(angle)).astype(np.float32)[:, None, :],
        FRONTEND_KEYS[2]: np.array(fe.mel_filterbank(config.sample_rate, n_fft, config.mel_bins,
                                                     config.fmin, config.fmax)),
    }


def to_state_dict(variables: Mapping[str, Any], model: Any, *, include_frontend: bool = True,
                  num_batches_tracked: int = 0) -> Dict[str, np.ndarray]:
    """Our ``{'params', 'batch_stats'}`` -> an original-PANNs state_dict of numpy arrays."""
    state: Dict[str, np.ndarray] = {}
    if include_frontend and uses_logmel(model):
        state.update(frontend_state(model.frontend))
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
        for path, value in flat.items():
            value = np.asarray(value)
            if path[-1] == "kernel":
                value = _kernel_to_torch(value)
            state[_torch_key(collection, path)] = np.ascontiguousarray(value.astype(np.float32))
            if collection == "batch_stats" and path[-1] == "mean":
                state[".".join(path[:-1] + ("num_batches_tracked",))] = np.array(
                    num_batches_tracked, dtype=np.int64)
    return state


@functools.lru_cache(maxsize=None)
def _expected_shapes(name: str, overrides: Tuple[Tuple[str, Any], ...] = ()) -> Dict[str, tuple]:
    model = models.get(name, **dict(overrides))
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), num_samples=None))
    state = to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                          model, include_frontend=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def expected_state_shapes(model: Any) -> Dict[str, tuple]:
    """Every state_dict key of the original model with its shape."""
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return {k: tuple(v.shape) for k, v in to_state_dict(zeros, model).items()}


def guess_architecture(state_dict: Mapping[str, Any], candidates: Optional[Iterable[str]] = None
                       ) -> Tuple[str, float]:
    """Name of the registered model whose keys and shapes best fit ``state_dict``."""
    got = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    best, best_score = "", -1.0
    for name in candidates or models.names():
        try:
            want = _expected_shapes(name)
        except Exception:  # A model that cannot be built at default settings.
            continue
        matching = sum(1 for k, s in want.items() if got.get(k) == s)
        score = matching / max(len(set(want) | set(got)), 1)
        if score > best_score:
            best, best_score = name, score
    return best, best_score


def _describe_mismatch(name: str, missing, unexpected, wrong_shape, state_dict) -> str:
    lines = [f"checkpoint does not fit {name}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {', '.join(sorted(missing)[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected)[:10])}"
                     + (" ..." if len(unexpected) > 10 else ""))
    for key, (got, want) in sorted(wrong_shape.items())[:10]:
        lines.append(f"  shape mismatch for {key}: checkpoint {got}, {name} expects {want}")
    if "fc_audioset.weight" in wrong_shape:
        classes = wrong_shape["fc_audioset.weight"][0][0]
        lines.append(f"  the checkpoint has {classes} classes: pass num_classes={classes}, or "
                     "use the transfer option to keep everything but the head")
    guess, score = guess_architecture(state_dict)
    if guess and guess != name and score > 0.5:
        lines.append(f"  the checkpoint looks like {guess} ({score:.0%} of keys and shapes match)")
    return "\n".join(lines)


def from_state_dict(state_dict: Mapping[str, Any], model: Any, *, name: str = "the model",
                    skip_head: bool = False) -> Dict[str, Any]:
    """An original-PANNs state_dict -> our ``{'params', 'batch_stats'}`` for ``model``.

    Strict: missing, unexpected or mis-shaped entries raise one
    :class:`CheckpointMismatchError` listing every difference. Front-end buffers
    and ``num_batches_tracked`` are accepted and ignored (ours are constants).
    With ``skip_head`` the classifier (``fc_audioset``/``att_block``) keeps the
    model's fresh initialisation, for transfer to another class count.
    """
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    wanted: Dict[str, Tuple[str, Tuple[str, ...], tuple]] = {}
    for collection in ("params", "batch_stats"):
        for path, value in flax.traverse_util.flatten_dict(template.get(collection, {})).items():
            wanted[_torch_key(collection, path)] = (collection, path, value.shape)

    def is_head(key: str) -> bool:
        return skip_head and key.startswith(("fc_audioset.", "att_block.att.", "att_block.cla."))

    ignorable = set(FRONTEND_KEYS) if uses_logmel(model) else set()
    given = {k for k in state_dict if not k.endswith("num_batches_tracked") and k not in ignorable}
    missing = [k for k in wanted if k not in given and not is_head(k)]
    unexpected = [k for k in given if k not in wanted]
    if not uses_logmel(model):
        unexpected += [k for k in state_dict if k in FRONTEND_KEYS]
    wrong_shape = {}
    for key in given & set(wanted):
        collection, path, shape = wanted[key]
        got = tuple(np.shape(state_dict[key]))
        torch_shape = _kernel_to_torch(np.zeros(shape)).shape if path[-1] == "kernel" else shape
        if got != tuple(torch_shape) and not is_head(key):
            wrong_shape[key] = (got, tuple(torch_shape))
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            _describe_mismatch(name, missing, unexpected, wrong_shape, state_dict))

    flat: Dict[str, Dict[Tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, shape) in wanted.items():
        if is_head(key):
            continue
        value = np.asarray(state_dict[key], dtype=np.float32)
        if path[-1] == "kernel":
            value = _kernel_from_torch(value)
        flat[collection][path] = value
    result = {c: flax.traverse_util.unflatten_dict(v) for c, v in flat.items() if v}
    if skip_head:
        fresh = models.init(model, jax.random.key(0))
        for collection in result:
            merged = flax.traverse_util.flatten_dict(jax.device_get(fresh[collection]))
            merged.update(flax.traverse_util.flatten_dict(result[collection]))
            result[collection] = flax.traverse_util.unflatten_dict(merged)
    return result
