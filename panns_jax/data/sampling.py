"""Which record each position of the training stream reads: stateless samplers in numpy.

Imports numpy only (no TensorFlow, no TFDS), so the sampler can be used and tested
without TensorFlow's import. `panns_jax.data.pipeline` feeds it to tf.data.

The stream is a pure function of (seed, k) over the whole selection of records, the
same on every host: draw k of the global stream is record `records[sampler(k)]`,
and its crop offset is hashed from (seed, k) too (see pipeline.py for what that buys).

Balanced sampling follows Kong et al. 2020, Sec. IV-A and TRAINING.md Sec. 3. The
stream is a sequence of fresh random permutations of all classes. Each time class c
comes up, it yields the next example of its own shuffled list, which is reshuffled
after every pass. Because every permutation contains c exactly once, draw k = e*C + j
is class perm_e[j] and it is that class's e-th draw, so its example is
shuffle_{c, e // n_c}[e % n_c]. Both permutations are evaluated lazily by
`permute` (a keyed Feistel network with cycle walking, a bijection of [0, n)).
This is the paper's sampler in distribution (not in numpy's random numbers).
Multi-label clips are in the list of each of their classes. Classes without
examples in the selection (folds, `fraction`) are left out of the permutations.

Uniform sampling: epoch e = k // N is a fresh random permutation of the N
examples.

Evaluation is sharded by records instead (`select_records`): host h reads the
h-th contiguous part of the selection, every example exactly once over all hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # common imports TFDS and TensorFlow: only its type is needed here.
    from panns_jax.data.common import ExampleIndex

_U = np.uint64
KEY_NAMES = ("class", "member", "uniform", "crop")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash."""
    x = x + _U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def hash_ints(*parts: ArrayLike) -> np.ndarray:
    """Order-dependent uint64 hash of integer arrays (broadcast)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), _U)
        for p in parts:
            h = _mix(h ^ np.asarray(p).astype(_U))
        return h


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """pi_key(i), where pi_key is a key-chosen permutation of [0, n).

    A 4-round Feistel network on the smallest 2h-bit domain holding n, with cycle
    walking back into [0, n). It is vectorised over i, n and key (broadcast).
    """
    i, n, key = np.broadcast_arrays(np.asarray(i, _U), np.asarray(n, _U), np.asarray(key, _U))
    half = np.ceil(np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))) / 2)
    half = half.astype(_U)
    mask = (_U(1) << half) - _U(1)
    # Round r's function is hash_ints(key, r, right): its (key, r) prefix is hashed once.
    rounds = [hash_ints(key, r) for r in range(4)]
    x = i.copy()
    todo = np.ones(x.shape, bool)
    with np.errstate(over="ignore"):
        while todo.any():
            xs, h, m = x[todo], half[todo], mask[todo]
            for prefix in rounds:
                left, right = xs >> h, xs & m
                xs = (right << h) | (left ^ (_mix(prefix[todo] ^ right) & m))
            x[todo] = xs
            todo[todo] = xs >= n[todo]
    return x.astype(np.int64)


def seed_keys(seed: int) -> Dict[str, np.uint64]:
    """The stream's keys: the same on every host, since the stream is global."""
    # The entropy [seed, 0] is fixed: another one would change every stream, and a
    # checkpoint's iterator state must resume the same data order.
    state = np.random.SeedSequence([seed, 0]).generate_state(len(KEY_NAMES), _U)
    return dict(zip(KEY_NAMES, state))


def crop_hashes(keys: Mapping[str, np.uint64], k: np.ndarray) -> np.ndarray:
    """The hash of each draw k that places its crop (see `crop_offsets`)."""
    return hash_ints(keys["crop"], k)


def crop_offsets(hashes: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """Start of each draw's window in a clip `excess` samples longer than the crop: a
    uniform pick of the excess + 1 possible starts (0 where the clip is not longer)."""
    excess = np.maximum(np.asarray(excess, np.int64), 0)
    return (np.asarray(hashes, _U) % (excess + 1).astype(_U)).astype(np.int64)


class BalancedSampler:
    """k -> position in `records` (see the module docstring)."""

    def __init__(
        self,
        index: "ExampleIndex",
        records: np.ndarray,
        num_classes: int,
        keys: Mapping[str, np.uint64],
    ):
        # Each class's list holds the positions of its records in increasing order.
        records = np.asarray(records, np.int64)
        starts = index.offsets[records]
        lengths = index.offsets[records + 1] - starts
        positions = np.repeat(np.arange(len(records), dtype=np.int64), lengths)
        # Flat index of each (record, label) pair: its record's start + its rank within it.
        before = np.cumsum(lengths) - lengths
        flat = np.repeat(starts - before, lengths) + np.arange(len(positions), dtype=np.int64)
        labels = index.flat_labels[flat].astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"Label ids must be in [0, {num_classes}).")
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        self.class_ids = np.flatnonzero(counts).astype(np.int64)
        if not len(self.class_ids):
            raise ValueError("Balanced sampling needs labelled examples; none found.")
        self.counts = counts[self.class_ids].astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.members = positions[order]
        self._keys = keys

    def __call__(self, k: np.ndarray) -> np.ndarray:
        num = len(self.class_ids)
        epoch, j = k // num, k % num
        slot = permute(j, num, hash_ints(self._keys["class"], epoch))
        n = self.counts[slot]
        m = permute(epoch % n, n, hash_ints(self._keys["member"], self.class_ids[slot], epoch // n))
        return self.members[self.offsets[slot] + m]


class UniformSampler:
    """k -> position: epoch k // N is a fresh permutation of the N positions."""

    def __init__(self, num: int, keys: Mapping[str, np.uint64]):
        if num == 0:
            raise ValueError("No examples to sample from.")
        self._num, self._keys = num, keys

    def __call__(self, k: np.ndarray) -> np.ndarray:
        return permute(k % self._num, self._num, hash_ints(self._keys["uniform"], k // self._num))


def select_records(
    index: "ExampleIndex",
    *,
    folds: Optional[Sequence[int]],
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Record ids of this host: disjoint contiguous shards covering the selection
    (all of it for process_count=1, which is what training samples from)."""
    records = np.arange(len(index), dtype=np.int64)
    if folds is not None:
        if "fold" not in index.columns:
            raise ValueError("folds= given but the dataset has no fold column.")
        records = records[np.isin(index.columns["fold"], np.asarray(folds))]
    bounds = np.linspace(0, len(records), process_count + 1).round().astype(int)
    return records[bounds[process_index] : bounds[process_index + 1]]


def subset(records: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of `records`, in record order (the paper's data-amount ablation)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return records
    keep = np.random.default_rng(seed).permutation(len(records))
    return records[np.sort(keep[: max(1, int(round(fraction * len(records))))])]


class SelectionError(ValueError):
    """A selection of training records the data cannot give (too few clips of a class)."""


def per_class(
    records: np.ndarray,
    index: "ExampleIndex",
    clips: int,
    seed: int,
    names: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """A seeded choice of exactly ``clips`` records of each class, in record order.

    The paper's curves of accuracy against training clips per class (Figs. 6-11) train on
    such subsets. Defined for single-label data, where the classes partition the records;
    SelectionError for multi-label records or a class with fewer than ``clips`` records.
    """
    if clips < 1:
        raise ValueError(f"clips per class must be >= 1, got {clips}")
    counts = np.diff(index.offsets)[records]
    if np.any(counts != 1):
        raise SelectionError("clips per class needs one label per clip (single-label data)")
    labels = index.flat_labels[index.offsets[records]]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = records[labels == label]
        if len(members) < clips:
            name = repr(names[label]) if names is not None else int(label)
            raise SelectionError(
                f"class {name} has {len(members)} training clips, fewer than {clips}"
            )
        chosen.append(rng.choice(members, clips, replace=False))
    return np.sort(np.concatenate(chosen))
