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

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import flax
import jax
import numpy as np

from panns_jax import fileio, models
from panns_jax import frontend as fe

if TYPE_CHECKING:
    from panns_jax import checkpoints

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


def _torch_axes(ndim: int) -> Tuple[int, ...]:
    """The kernel's axes in torch order (the layout table above); reversed for 2-D."""
    return {4: (3, 2, 0, 1), 3: (2, 1, 0)}.get(ndim, tuple(reversed(range(ndim))))


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(_torch_axes(kernel.ndim))


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(np.argsort(_torch_axes(weight.ndim)))


def _torch_key(collection: str, path: Tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_LEAF_TO_SUFFIX[(collection, path[-1])],))


def _is_classifier(key: str) -> bool:
    """Whether a state_dict key belongs to the classifier.

    The classifier's modules are :data:`models.CLASSIFIER_PARAMS`; by the naming rule above
    their keys start with those names.
    """
    return key.split(".", 1)[0] in models.CLASSIFIER_PARAMS


def uses_logmel(model: Any) -> bool:
    """Whether the original model owns STFT/mel front-end buffers."""
    return getattr(model, "uses_logmel", True)


def frontend_state(config: fe.FrontendConfig) -> Dict[str, np.ndarray]:
    """The original's fixed front-end tensors: DFT-as-conv kernels and the mel matrix.

    ``conv_real[k, 0, n] = hann[n] cos(2 pi k n / N)``, ``conv_imag = -hann[n] sin(...)``.
    """
    real, imag = fe.windowed_dft_basis(config.window_size)
    return {
        FRONTEND_KEYS[0]: real.astype(np.float32)[:, None, :],
        FRONTEND_KEYS[1]: imag.astype(np.float32)[:, None, :],
        FRONTEND_KEYS[2]: np.array(
            fe.mel_filterbank(
                config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax
            )
        ),
    }


def to_state_dict(
    variables: Mapping[str, Any],
    model: Any,
    *,
    include_frontend: bool = True,
    num_batches_tracked: int = 0,
    dtype: Any = np.float32,
) -> Dict[str, np.ndarray]:
    """Our ``{'params', 'batch_stats'}`` -> an original-PANNs state_dict of numpy arrays.

    The arrays are ``dtype``: float32 as the original's checkpoints hold them, or float64
    to read a float64 run in the original's layout without rounding it.
    """
    entries = _state_entries(variables, model, include_frontend, num_batches_tracked)
    return {
        key: np.array(value, dtype=dtype, order="C") if variable else value
        for key, value, variable in entries
    }


def _state_entries(
    variables: Mapping[str, Any], model: Any, include_frontend: bool, num_batches_tracked: int
) -> Iterator[Tuple[str, np.ndarray, bool]]:
    """``(key, array, is_variable)`` for each entry of the original's state_dict.

    A variable's kernel is a transposed view into the original's axis order (no copy); the
    front end's buffers and BatchNorm's ``num_batches_tracked`` are not variables.
    """
    from panns_jax.models.transfer_head import Transfer

    if isinstance(model, Transfer):  # Its base/ and fc_hidden* keys fit no original model.
        raise ValueError(
            f"a transfer model with a {model.head_layers}-layer head (Freeze_L3) "
            "has no original PANNs layout; export it with `panns-jax export`"
        )
    if include_frontend and uses_logmel(model):
        for key, value in frontend_state(model.frontend).items():
            yield key, value, False
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
        for path, value in flat.items():
            value = np.asarray(value)
            if path[-1] == "kernel":
                value = _kernel_to_torch(value)
            yield _torch_key(collection, path), value, True
            if collection == "batch_stats" and path[-1] == "mean":
                key = ".".join(path[:-1] + ("num_batches_tracked",))
                yield key, np.array(num_batches_tracked, dtype=np.int64), False


# Every registered model's keys and shapes at its default settings ship as an asset, so that
# naming the architecture of a mismatched checkpoint traces no model (all 29 take ~6 s).
# tests/test_convert.py checks the file against expected_state_shapes.
STATE_SHAPES_ASSET = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "state_shapes.json"
)


@functools.lru_cache(maxsize=1)
def _shipped_state_shapes() -> Dict[str, Dict[str, tuple]]:
    with open(STATE_SHAPES_ASSET, encoding="utf-8") as f:
        table = json.load(f)
    return {name: {k: tuple(s) for k, s in shapes.items()} for name, shapes in table.items()}


def state_shapes_table() -> Dict[str, Dict[str, tuple]]:
    """:func:`expected_state_shapes` of every registered model at its default settings."""
    return {name: expected_state_shapes(models.get(name)) for name in models.names()}


def write_state_shapes_table(path: str = STATE_SHAPES_ASSET) -> None:
    """Write :func:`state_shapes_table` as the shipped asset: one model per line, keys sorted."""
    table = state_shapes_table()
    lines = [
        f"{json.dumps(name)}: {json.dumps({k: list(s) for k, s in sorted(shapes.items())})}"
        for name, shapes in sorted(table.items())
    ]
    with fileio.staged(path) as staging, open(staging, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


@functools.lru_cache(maxsize=None)
def _expected_shapes(name: str) -> Dict[str, tuple]:
    shipped = _shipped_state_shapes().get(name)
    return shipped if shipped is not None else expected_state_shapes(models.get(name))


def expected_state_shapes(model: Any) -> Dict[str, tuple]:
    """Every state_dict key of the original model with its shape.

    Each variable is one zero broadcast to its shape (a view that holds no memory), so
    guessing the architecture of a stranger's checkpoint allocates no weights.
    """
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    views = jax.tree_util.tree_map(
        lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes
    )
    entries = _state_entries(views, model, include_frontend=True, num_batches_tracked=0)
    return {key: tuple(value.shape) for key, value, _ in entries}


def guess_architecture(
    state_dict: Mapping[str, Any], candidates: Optional[Iterable[str]] = None
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
        lines.append(
            f"  {len(missing)} missing key(s): {', '.join(sorted(missing)[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected)[:10])}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    for key, (got, want) in sorted(wrong_shape.items())[:10]:
        lines.append(f"  shape mismatch for {key}: checkpoint {got}, {name} expects {want}")
    head = next(
        (s for k, s in sorted(wrong_shape.items()) if _is_classifier(k) and k.endswith(".weight")),
        None,
    )
    class_count_differs = bool(head) and head[0][:1] != head[1][:1]
    if class_count_differs:
        classes = head[0][0]
        lines.append(
            f"  the checkpoint has {classes} classes: pass num_classes={classes}, or "
            "use the transfer option to keep everything but the head"
        )
    guess, score = guess_architecture(state_dict)
    if guess and guess != name and score > 0.5:
        lines.append(f"  the checkpoint looks like {guess} ({score:.0%} of keys and shapes match)")
    class_count_only = class_count_differs and all(map(_is_classifier, wrong_shape))
    if not missing and not unexpected and not class_count_only and score < 1.0:
        # Same layers, other sizes, and no registered model fits: the architecture is right,
        # its arguments are not (a narrow model exported with to-torch).
        lines.append(
            f"  every layer of {name} is there with other sizes: pass the "
            'architecture arguments it was built with (--overrides \'{"widths": '
            "[...], ...}')"
        )
    return "\n".join(lines)


def from_state_dict(
    state_dict: Mapping[str, Any], model: Any, *, name: str = "the model", skip_head: bool = False
) -> Dict[str, Any]:
    """An original-PANNs state_dict -> our ``{'params', 'batch_stats'}`` for ``model``.

    Missing, unexpected or mis-shaped entries raise one :class:`CheckpointMismatchError`
    that lists every difference. Front-end buffers and ``num_batches_tracked`` are
    accepted and ignored, since ours are constants. With ``skip_head`` the classifier
    (:data:`models.CLASSIFIER_PARAMS`) keeps the model's fresh initialisation, for
    transfer to another class count.
    """
    wanted = _wanted_entries(model)
    missing, unexpected, wrong_shape = _differences(state_dict, model, wanted, skip_head)
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            _describe_mismatch(name, missing, unexpected, wrong_shape, state_dict)
        )
    flat: Dict[str, Dict[Tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, _shape) in wanted.items():
        if skip_head and _is_classifier(key):
            continue
        value = np.asarray(state_dict[key], dtype=np.float32)
        if path[-1] == "kernel":
            value = _kernel_from_torch(value)
        flat[collection][path] = value
    result = {c: flax.traverse_util.unflatten_dict(v) for c, v in flat.items() if v}
    return _with_fresh_head(result, model) if skip_head else result


def _wanted_entries(model: Any) -> Dict[str, Tuple[str, Tuple[str, ...], tuple]]:
    """Each state_dict key ``model`` needs, with its collection, flax path and flax shape."""
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    wanted: Dict[str, Tuple[str, Tuple[str, ...], tuple]] = {}
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes.get(collection, {})))
        for path, value in flat.items():
            wanted[_torch_key(collection, path)] = (collection, path, tuple(value.shape))
    return wanted


def _differences(
    state_dict: Mapping[str, Any],
    model: Any,
    wanted: Mapping[str, Tuple[str, Tuple[str, ...], tuple]],
    skip_head: bool,
) -> Tuple[List[str], List[str], Dict[str, Tuple[tuple, tuple]]]:
    """The keys ``state_dict`` lacks, the keys it has beyond ``wanted``, and the keys whose
    shape differs, each as (given, expected) in torch's layout.

    The classifier's keys are neither missing nor mis-shaped when ``skip_head`` drops it.
    """
    ignorable = set(FRONTEND_KEYS) if uses_logmel(model) else set()
    given = {k for k in state_dict if not k.endswith("num_batches_tracked") and k not in ignorable}
    skipped = {k for k in wanted if skip_head and _is_classifier(k)}
    missing = [k for k in wanted if k not in given and k not in skipped]
    unexpected = [k for k in given if k not in wanted]
    if not uses_logmel(model):
        unexpected += [k for k in state_dict if k in FRONTEND_KEYS]
    wrong_shape = {}
    for key in (given & set(wanted)) - skipped:
        _collection, path, shape = wanted[key]
        got = tuple(np.shape(state_dict[key]))
        torch_shape = _kernel_to_torch(np.zeros(shape)).shape if path[-1] == "kernel" else shape
        if got != tuple(torch_shape):
            wrong_shape[key] = (got, tuple(torch_shape))
    return missing, unexpected, wrong_shape


def _with_fresh_head(variables: Dict[str, Any], model: Any) -> Dict[str, Any]:
    """``variables`` completed with ``model``'s seed-0 initialisation where they lack a leaf
    (the classifier that ``skip_head`` left out)."""
    fresh = models.init(model, jax.random.key(0))
    result = {}
    for collection, tree in variables.items():
        merged = flax.traverse_util.flatten_dict(jax.device_get(fresh[collection]))
        merged.update(flax.traverse_util.flatten_dict(tree))
        result[collection] = flax.traverse_util.unflatten_dict(merged)
    return result


# ----------------------------------------------------------------------------
# .pth files, read and written by panns_jax.pth without torch.
# ----------------------------------------------------------------------------


def read_torch_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], int]:
    """``(state_dict as numpy, iteration)`` of an original PANNs ``.pth``, without torch.

    Accepts ``{'model': state_dict, 'iteration': ..., ...}`` as saved by the original
    training script, or a bare state_dict, of tensors or numpy arrays. Never executes
    pickled code: :mod:`panns_jax.pth` refuses every global outside its allow-list.
    bfloat16 and float16 tensors are widened to float32 (exactly).
    """
    from panns_jax import pth

    payload = pth.load(path)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state, iteration = payload["model"], payload.get("iteration", 0)
    elif (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, np.ndarray) for v in payload.values())
    ):
        state, iteration = payload, 0
    else:
        found = (
            f"top-level keys: {sorted(map(str, payload))[:10]}"
            if isinstance(payload, dict)
            else f"a {type(payload).__name__}"
        )
        raise ValueError(
            f"{path}: neither a state_dict nor a dict with a 'model' state_dict ({found})"
        )
    if not isinstance(iteration, (int, np.integer)) or isinstance(iteration, bool):
        iteration = 0  # Not the original's training step: not ours to interpret.
    result: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state_dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray) or not (
            value.dtype.kind in "fiub" or value.dtype.name == "bfloat16"
        ):
            what = (
                f"a {value.dtype} array"
                if isinstance(value, np.ndarray)
                else f"a {type(value).__name__}"
            )
            raise ValueError(f"{path}: state_dict entry {key!r} is {what}, not a numeric tensor")
        if value.dtype.name in ("bfloat16", "float16"):
            value = value.astype(np.float32)
        result[key[len("module.") :] if key.startswith("module.") else key] = value
    return result, int(iteration)


def write_torch_checkpoint(
    path: str, state_dict: Mapping[str, np.ndarray], iteration: int = 0
) -> None:
    """Save ``{'model': state_dict, 'iteration': iteration}`` as the original does, atomically.

    Written by :mod:`panns_jax.pth` (no torch needed); ``torch.load(weights_only=True)``
    reads it and the original model classes load it strictly.
    """
    import collections

    from panns_jax import fileio, pth

    tensors = collections.OrderedDict((k, np.asarray(v)) for k, v in state_dict.items())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with fileio.staged(path) as staging, open(staging, "xb") as f:
        pth.save(f, {"model": tensors, "iteration": int(iteration)})


def head_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    """The class count of an original state_dict's classifier, None without one.

    It is the output size (the first torch dimension) of the classifier's weights: 527 for
    the released models.
    """
    for key in sorted(state_dict):
        if _is_classifier(key) and key.endswith(".weight"):
            return int(np.shape(state_dict[key])[0])
    return None


def torch_to_checkpoint(
    state_dict: Mapping[str, Any],
    model_name: str,
    *,
    num_classes: Optional[int] = None,
    new_head: bool = False,
    step: int = 0,
    seed: int = 0,
    overrides: Optional[Mapping[str, Any]] = None,
) -> "checkpoints.ModelCheckpoint":
    """An original state_dict -> a :class:`~panns_jax.checkpoints.ModelCheckpoint`.

    The class count is the checkpoint's own unless ``num_classes`` says otherwise. With
    ``new_head`` the classifier is re-initialised for ``num_classes`` classes (transfer
    learning); everything else is copied. ``overrides`` are further architecture
    arguments of ``model_name`` (e.g. a front end).
    """
    from panns_jax import checkpoints

    if new_head and num_classes is None:
        raise ValueError("new_head needs num_classes: the class count of the new head")
    overrides = dict(overrides or {})
    classes = num_classes if num_classes is not None else head_classes(state_dict)
    if classes is not None and classes != models.get(model_name, **overrides).num_classes:
        overrides["num_classes"] = classes
    model = models.get(model_name, **overrides)
    variables = from_state_dict(state_dict, model, name=model_name, skip_head=new_head)
    if new_head and seed:
        fresh = models.init(model, jax.random.key(seed))
        head = {k: v for k, v in fresh["params"].items() if k in models.CLASSIFIER_PARAMS}
        variables["params"] = {**variables["params"], **jax.device_get(head)}
    return checkpoints.ModelCheckpoint(
        model=model_name, variables=variables, overrides=overrides, step=step
    )


if __name__ == "__main__":  # `python -m panns_jax.convert from-torch ...` runs the command.
    import runpy  # Not an import of panns_jax.cli.convert, whose loader imports this module.

    runpy.run_module("panns_jax.cli.convert", run_name="__main__", alter_sys=True)
