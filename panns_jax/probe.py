"""Linear-probe benchmark: how well a model's embeddings separate the classes of a data set.

    panns-jax probe DATA --model Cnn14          # a folder per class or a CSV/TSV manifest
    panns-jax probe esc50 --model DIR/best      # one of the paper's transfer sets, built

Each recording's embedding is computed once (segments of ``clip_seconds`` averaged per
recording) and cached per model and data in the user cache, so a second probe of the same
model and data fits classifiers only. Two classifiers are fitted on the training recordings
and scored on the held-out ones: a logistic regression on standardized embeddings (one vs
rest for multi-label data) and a k-nearest-neighbour vote under the cosine distance. Sets with
folds are cross-validated (each fold held out once); sets with splits train on ``train``
and score each evaluation split. The metrics are the task's (:mod:`panns_jax.tasks`), as
``panns-jax finetune`` reports them, so a probe and a fine-tuning run compare directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from panns_jax import config_checks, fileio, finetune, loader, metrics, recipe, report, tasks
from panns_jax.data import common, custom, inputs, pipeline, sources
from panns_jax.recipe import ConfigError

CLASSIFIERS = ("logistic", "knn")
MIN_DEFAULT_SEGMENT_SECONDS = 1.0
CACHE_VERSION = 1  # Part of every cache key: a change of how embeddings are made bumps it.
_KEYS = ("embedding", "labels", "fold", "record")  # The arrays of each split in the cache.
SKLEARN_MISSING = "panns-jax probe needs scikit-learn: pip install 'panns-jax[probe]'"
# The metrics a table shows, per task; the JSON holds every summary key of the task.
SHOWN = {tasks.SINGLELABEL: ("accuracy", "map_at_3"), tasks.MULTILABEL: ("mAP",)}


@dataclasses.dataclass
class Data:
    """What is probed: the TFDS set, its classes and task, and how it is split.

    ``num_folds`` > 0: every recording lies in ``train_split`` and its folds are held out in
    turn; else the classifiers fit on ``train_split`` and score each of ``eval_splits``.
    """

    source: str  # What the user named: DATA or a transfer set's name.
    dataset: str  # The TFDS name, with its config (own data: named by its files' fingerprint).
    data_dir: Optional[str]
    task: str
    classes: Tuple[str, ...]
    clip_seconds: float
    num_folds: int
    train_split: str
    eval_splits: Tuple[str, ...]
    own: bool

    @property
    def splits(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys((self.train_split, *self.eval_splits)))


# ----------------------------------------------------------------------------
# The model and the data.
# ----------------------------------------------------------------------------


def model_key(model: str, arch: Optional[str], overrides: Optional[Mapping[str, Any]]) -> str:
    """What identifies the weights of ``model``: a zoo name, or a path's real path with the
    size and modification time of each of its files (a retrained checkpoint is new)."""
    if not os.path.exists(model):
        return f"zoo:{model}"
    real = os.path.realpath(model)
    paths = [real]
    if os.path.isdir(real):
        paths = sorted(os.path.join(d, f) for d, _, names in os.walk(real) for f in names)
    stats = [(os.path.relpath(p, real), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return json.dumps([real, stats, arch, dict(overrides or {})], sort_keys=True, default=str)


def default_segment_seconds(found: custom.Scan) -> float:
    """The shortest recording, rounded down to 0.1 s, within 1..10 s (10 s when no header
    says): every recording is then covered by whole segments. Zero-padding short recordings
    up to the longest one's length (fine-tuning's clip) lets the silence, whose share varies
    with each recording's length, dominate the embeddings."""
    if not found.durations:
        return finetune.MAX_DEFAULT_CLIP_SECONDS
    shortest = math.floor(min(found.durations) * 10 + 1e-6) / 10
    return min(finetune.MAX_DEFAULT_CLIP_SECONDS, max(MIN_DEFAULT_SEGMENT_SECONDS, shortest))


def describe_data(
    data: str,
    sample_rate: int,
    *,
    data_dir: Optional[str],
    clip_seconds: Optional[float] = None,
    holdout: float = custom.DEFAULT_HOLDOUT,
    seed: int = 0,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
) -> Data:
    """The :class:`Data` of own audio at ``data`` (scanned, registered, not yet built) or of
    the transfer set named ``data`` (its build must exist in ``data_dir``)."""
    if not os.path.exists(data) and data in recipe.TRANSFER_SETS:
        return _transfer_data(data, sample_rate, data_dir, clip_seconds)
    if not os.path.exists(data):
        raise ConfigError(
            f"{data}: no such folder or manifest file, nor a transfer set "
            f"({', '.join(recipe.TRANSFER_SETS)})"
        )
    found = custom.scan(data, holdout=holdout, seed=seed, max_bad_fraction=max_bad_fraction)
    folds = found.partition == "folds"
    return Data(
        source=data,
        dataset=custom.register(found, sample_rate, max_bad_fraction),
        data_dir=data_dir,
        task=found.task,
        classes=found.classes,
        clip_seconds=default_segment_seconds(found) if clip_seconds is None else clip_seconds,
        num_folds=found.num_folds if folds else 0,
        train_split="train",
        eval_splits=("train",) if folds else tuple(s for s in found.splits if s != "train"),
        own=True,
    )


def _transfer_data(
    name: str, sample_rate: int, data_dir: Optional[str], clip_seconds: Optional[float]
) -> Data:
    protocol = recipe.TRANSFER_SETS[name]
    rates = {r: f"{r // 1000}k" for r in common.SAMPLE_RATES}
    if sample_rate not in rates:
        raise ConfigError(f"the model takes {sample_rate} Hz audio; {name} is built at {rates}")
    config = recipe.transfer_set_config(name, f"sr={rates[sample_rate]}")
    if clip_seconds is not None:
        config.clip_seconds = clip_seconds
    config.data_dir = data_dir
    builder = inputs.get_builder(config)  # One ConfigError line when the set is not built.
    label = builder.info.features["label"]
    return Data(
        source=name,
        dataset=config.dataset,
        data_dir=os.fspath(builder.data_dir_root),
        task=config.task,
        classes=tuple(label.names),
        clip_seconds=config.clip_seconds,
        num_folds=protocol.num_folds or 0,
        train_split=config.train_split,
        eval_splits=(config.eval_split,),
        own=False,
    )


def open_builder(data: Data) -> Any:
    """The TFDS builder of ``data``, own data decoded into records first unless it was."""
    if data.own:
        return custom.prepare(data.dataset, data.data_dir)
    return sources.get_builder(data.dataset, data_dir=data.data_dir)


# ----------------------------------------------------------------------------
# Embeddings, computed once per model and data.
# ----------------------------------------------------------------------------


def cache_path(cache_dir: str, model: str, data: Data, sample_rate: int) -> str:
    """The cache file of the embeddings of ``model`` (a :func:`model_key`) on ``data``."""
    # Own data's name holds its files' fingerprint; a transfer set's build is its folder's.
    where = None if data.own else os.path.realpath(data.data_dir)
    what = [CACHE_VERSION, model, data.dataset, where, sample_rate, data.clip_seconds]
    digest = hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"{digest}.npz")


def embed_function(loaded: loader.Loaded) -> Callable[[np.ndarray], np.ndarray]:
    """A jitted ``audio [B, L] -> embedding [B, D]`` of the loaded model (a decision-level
    model's segment-wise embedding averaged over time)."""
    import jax
    import jax.numpy as jnp

    from panns_jax import models

    module, variables, meta = loaded
    key = meta.outputs.embedding

    def embedding(v: Any, audio: jax.Array) -> jax.Array:
        out = module.apply(v, audio)[key]
        return jnp.mean(out, axis=1) if out.ndim == 3 else out

    apply = models.jit_inference(module, embedding)

    return lambda audio: np.asarray(apply(variables, audio), np.float32)


def embed_split(
    embed: Callable[[np.ndarray], np.ndarray],
    builder: Any,
    split: str,
    *,
    clip_samples: int,
    batch_size: int,
    progress: bool = True,
) -> Dict[str, np.ndarray]:
    """Every recording of ``split``: ``embedding`` (mean over its segments), ``labels``
    (multi-hot), ``fold`` (0 without folds) and ``record`` (its id in the split)."""
    from tqdm import tqdm

    source = sources.make_source(builder, split)
    batches = pipeline.make_eval_iterator(
        source, split, batch_size=batch_size, clip_samples=clip_samples, segments=True
    )
    shown = tqdm(batches, desc=f"embedding {split}", unit="batch", disable=not progress)
    rows, labels, records = pipeline.eval_rows(shown, embed)
    unique, embedding, multi_hot = metrics.mean_by_record(records, rows, labels)
    folds = getattr(source.index, "columns", {}).get("fold")
    return {
        "embedding": embedding.astype(np.float32),
        "labels": multi_hot.astype(np.float32),
        "fold": np.asarray(folds)[unique].astype(np.int64) if folds is not None else 0 * unique,
        "record": unique.astype(np.int64),
    }


def read_cache(path: str, splits: Sequence[str]) -> Optional[Dict[str, Dict[str, np.ndarray]]]:
    """``{split: embed_split's arrays}`` from the ``.npz`` at ``path``; None when there is none,
    or a damaged or older one (it is then made anew)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as stored:
            return {s: {k: stored[f"{s}.{k}"] for k in _KEYS} for s in splits}
    except (OSError, ValueError, KeyError):
        return None


def write_cache(path: str, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Store ``{split: embed_split's arrays}`` at ``path`` in one rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    flat = {f"{s}.{k}": v for s, split in arrays.items() for k, v in split.items()}
    with fileio.staged(path) as staging, open(staging, "wb") as f:
        np.savez(f, **flat)


# ----------------------------------------------------------------------------
# Classifiers and scores.
# ----------------------------------------------------------------------------


def check_sklearn() -> None:
    """ConfigError naming the extra to install when scikit-learn is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError(SKLEARN_MISSING) from None


def make_classifier(kind: str, task: str, num_train: int, seed: int = 0) -> Any:
    """An unfitted scikit-learn classifier: ``logistic`` (standardized, one vs rest for
    multi-label) or ``knn`` (cosine distance, k = min(5, training recordings))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        head = LogisticRegression(max_iter=1000, random_state=seed)
        if task == tasks.MULTILABEL:
            head = OneVsRestClassifier(head)
        return make_pipeline(StandardScaler(), head)
    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=min(5, num_train), metric="cosine")
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {kind!r}")


def fit_scores(
    kind: str,
    task: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """Scores ``[N, C]`` of ``test_x`` by a ``kind`` classifier fitted on multi-hot ``train_y``
    (a class absent from training scores 0)."""
    num_classes = train_y.shape[1]
    single = task == tasks.SINGLELABEL
    targets = np.argmax(train_y, axis=1) if single else (train_y > 0.5).astype(np.int64)
    fitted = make_classifier(kind, task, len(train_x), seed).fit(train_x, targets)
    proba = fitted.predict_proba(test_x)
    scores = np.zeros((len(test_x), num_classes), np.float64)
    if single:
        scores[:, fitted.classes_] = proba
    elif isinstance(proba, list):  # kNN on several outputs: P(0), P(1) per class.
        for c, (p, classes) in enumerate(zip(proba, fitted.classes_)):
            scores[:, c] = p[:, list(classes).index(1)] if 1 in classes else 0.0
    else:
        scores[:] = proba
    return scores


def _json_float(value: Any) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def evaluation_sets(
    data: Data, arrays: Mapping[str, Mapping[str, np.ndarray]]
) -> Iterable[Tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
    """``(row name, training arrays, held-out arrays)`` of the data's protocol."""

    def take(split: Mapping[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
        return {k: v[keep] for k, v in split.items()}

    train = arrays[data.train_split]
    if data.num_folds:
        for fold in range(1, data.num_folds + 1):
            held = train["fold"] == fold
            yield f"fold {fold}", take(train, ~held), take(train, held)
    else:
        for split in data.eval_splits:
            yield split, train, arrays[split]


def probe(
    data: Data,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    *,
    seed: int = 0,
    classifiers: Sequence[str] = CLASSIFIERS,
) -> Dict[str, Any]:
    """Fit and score each classifier by the data's protocol; the JSON-ready results.

    ``rows`` hold each fold's (or evaluation split's) metrics, ``mean`` their mean over the
    folds. ``per_class_ap`` and (single-label) ``confusion_matrix`` are of the held-out
    predictions pooled over the folds, or of the first evaluation split.
    """
    task = tasks.get(data.task)
    rows, pooled = [], {k: ([], []) for k in classifiers}
    for index, (name, train, held) in enumerate(evaluation_sets(data, arrays)):
        if not len(held["embedding"]) or not len(train["embedding"]):
            raise ConfigError(f"{data.source}: {name} has no recordings to train or score on")
        single = data.task == tasks.SINGLELABEL
        if single and len(np.unique(np.argmax(train["labels"], axis=1))) < 2:
            raise ConfigError(
                f"{data.source}: the classifiers for {name} would train on one class only"
            )
        row: Dict[str, Any] = {
            "name": name,
            "num_train": len(train["embedding"]),
            "num_eval": len(held["embedding"]),
        }
        for kind in classifiers:
            scores = fit_scores(
                kind, data.task, train["embedding"], train["labels"], held["embedding"], seed
            )
            result = task.evaluate(scores, held["labels"])
            row[kind] = {k: _json_float(result[k]) for k in task.summary_keys}
            if data.num_folds or index == 0:
                pooled[kind][0].append(scores)
                pooled[kind][1].append(held["labels"])
        rows.append(row)
    results = {
        "data": data.source,
        "dataset": data.dataset,
        "task": data.task,
        "classes": list(data.classes),
        "clip_seconds": data.clip_seconds,
        "protocol": "folds" if data.num_folds else "splits",
        "classifiers": list(classifiers),
        "metrics": list(task.summary_keys),
        "rows": rows,
        "mean": _mean(rows, classifiers, task.summary_keys) if data.num_folds else None,
        "pictures_of": "all folds" if data.num_folds else data.eval_splits[0],
        "per_class_ap": {},
    }
    for kind, (scores, targets) in pooled.items():
        scores, targets = np.concatenate(scores), np.concatenate(targets)
        pooled_result = task.evaluate(scores, targets)
        ap = pooled_result["average_precision"]
        results["per_class_ap"][kind] = {c: _json_float(a) for c, a in zip(data.classes, ap)}
        if "confusion_matrix" in pooled_result:
            matrix = pooled_result["confusion_matrix"].tolist()
            results.setdefault("confusion_matrix", {})[kind] = matrix
    return results


def _mean(rows: List[Mapping[str, Any]], classifiers: Sequence[str], keys: Sequence[str]) -> Dict:
    """Each classifier's metrics averaged over the rows (None where a row has none)."""
    mean: Dict[str, Dict[str, Optional[float]]] = {}
    for kind in classifiers:
        mean[kind] = {}
        for key in keys:
            values = [r[kind][key] for r in rows]
            mean[kind][key] = None if None in values else float(np.mean(values))
    return mean


# ----------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------


def format_table(results: Mapping[str, Any]) -> str:
    """The results as a text table: a row per fold or evaluation split (and the mean), a
    column per classifier and shown metric (numbers with 4 decimals)."""
    shown = SHOWN[results["task"]]
    columns = [(kind, key) for kind in results["classifiers"] for key in shown]
    head = [f"{kind} {key}" for kind, key in columns]
    lines = [["", "train", "eval", *head]]
    for row in results["rows"]:
        lines.append([row["name"], str(row["num_train"]), str(row["num_eval"])])
        lines[-1] += [_cell(row[kind][key]) for kind, key in columns]
    if results.get("mean"):
        lines.append(["mean", "", "", *(_cell(results["mean"][k][m]) for k, m in columns)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
        for line in lines
    ]
    title = (
        f"{results['data']}: {len(results['classes'])} classes, {results['task']}, "
        f"{results['clip_seconds']:g} s segments, model {results.get('model', '?')}"
    )
    return "\n".join([title, *text])


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_outputs(results: Mapping[str, Any], directory: str) -> List[str]:
    """``probe_results.json`` and the pictures of each classifier (single-label: the confusion
    matrix summed over folds; multi-label: per-class AP) in ``directory``; their paths."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "probe_results.json")
    with fileio.staged(path) as staging, open(staging, "w") as f:
        json.dump(results, f, indent=2)
    written = [path]
    for kind in results["classifiers"]:
        if results["task"] == tasks.SINGLELABEL:
            picture = os.path.join(directory, f"confusion_matrix_{kind}.png")
            matrix = np.asarray(results["confusion_matrix"][kind])
            report.confusion_matrix_png(picture, matrix, results["classes"], title=kind)
        else:
            picture = os.path.join(directory, f"per_class_ap_{kind}.png")
            report.per_class_ap_png(picture, results["per_class_ap"][kind], title=kind)
        written.append(picture)
    return written


def default_cache_dir() -> str:
    """``probe/`` in the user cache (:func:`panns_jax.fileio.cache_dir`)."""
    return os.path.join(fileio.cache_dir(), "probe")


def run(
    data: str,
    model: str,
    *,
    arch: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    clip_seconds: Optional[float] = None,
    holdout: float = custom.DEFAULT_HOLDOUT,
    seed: int = 0,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    batch_size: int = 32,
    progress: bool = True,
) -> Dict[str, Any]:
    """Probe ``model`` on ``data`` (own audio or a transfer set's name); the results.

    Every bad input is a ConfigError before anything is written. Own data is decoded into
    records under ``data_dir`` (default: ``data/`` in the cache folder); the embeddings are
    cached in ``cache_dir`` (default :func:`default_cache_dir`); ``output_dir`` receives
    :func:`write_outputs`'s files.
    """
    check_sklearn()
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive number of clips, got {batch_size}")
    if clip_seconds is not None and not clip_seconds > 0:
        raise ConfigError(f"--clip-seconds must be positive, got {clip_seconds}")
    cache_dir = cache_dir or default_cache_dir()
    if os.path.exists(data):
        data_dir = data_dir or os.path.join(cache_dir, "data")
        finetune.check_outputs_outside(data, output_dir, cache_dir, data_dir)
    loaded = finetune.load_model(model, arch, overrides)
    rate = loaded.metadata.sample_rate
    described = describe_data(
        data,
        rate,
        data_dir=data_dir,
        clip_seconds=clip_seconds,
        holdout=holdout,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
    )
    what = f"--clip-seconds {described.clip_seconds:g}"
    config_checks.check_clip_fits(loaded.module, described.clip_seconds, what, loaded.metadata.name)
    path = cache_path(cache_dir, model_key(model, arch, overrides), described, rate)
    arrays = read_cache(path, described.splits)
    cached = arrays is not None
    if arrays is None:  # Decode the data (own data once) and embed every split.
        builder, embed = open_builder(described), embed_function(loaded)
        samples = int(round(described.clip_seconds * rate))
        arrays = {
            split: embed_split(
                embed,
                builder,
                split,
                clip_samples=samples,
                batch_size=batch_size,
                progress=progress,
            )
            for split in described.splits
        }
        write_cache(path, arrays)
    results = probe(described, arrays, seed=seed)
    results.update(model=model, embedding_cache=path, cached=cached)
    if output_dir:
        results["written"] = write_outputs(results, output_dir)
    return results
