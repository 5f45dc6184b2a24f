"""Evaluation metrics of the paper: mAP, mean AUC and d-prime (Kong et al. 2020, Sec. IV-D),
and the mAP@3 of DCASE 2018 Task 2 (Sec. VI-D, Table XV).

Metrics are per class (``average=None`` in scikit-learn's terms), as in the original
evaluation. AP is the step-wise (non-interpolated) average precision over distinct
score thresholds, and AUC the trapezoidal ROC area with ties counted half. mAP and mAUC
are the means over classes. d' = sqrt(2) * Phi^-1(mAUC) is computed from the *mean*
AUC. Classes without any positive (or negative) example have no AP/AUC. They are NaN
and left out of the means.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np


def _ranked(scores: np.ndarray, targets: np.ndarray):
    """Cumulative true/false positives at each distinct threshold, high to low."""
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(targets)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn's definition)."""
    targets = np.asarray(targets) > 0.5
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    tps, fps = _ranked(np.asarray(scores, np.float64), targets)
    precision = tps / (tps + fps)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve, trapezoidal over distinct thresholds."""
    targets = np.asarray(targets) > 0.5
    positives, negatives = targets.sum(), (~targets).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    tps, fps = _ranked(np.asarray(scores, np.float64), targets)
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(AUC): the sensitivity index the paper reports beside mAP.

    Phi^-1 is the standard library's (``statistics.NormalDist``): importing scipy.stats for
    it would cost the command lines half a second. An AUC of 0 or 1 gives -inf or inf.
    """
    auc = float(auc)
    if np.isnan(auc):
        return auc
    if auc <= 0.0:
        return float("-inf")
    if auc >= 1.0:
        return float("inf")
    return float(np.sqrt(2.0) * statistics.NormalDist().inv_cdf(auc))


def evaluate(scores: np.ndarray, targets: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-class AP and AUC of ``(N, C)`` arrays, with mAP, mAUC and d-prime."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be equal (N, C)")
    ap = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    auc = np.array([roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
    return {
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "mAUC": mean_auc,
        "d_prime": d_prime(mean_auc) if np.isfinite(mean_auc) else float("nan"),
        "average_precision": ap,
        "auc": auc,
    }


def confusion_matrix(
    targets: Sequence[int], predictions: Sequence[int], num_classes: int
) -> np.ndarray:
    """Counts ``[true class, predicted class]`` (int64, ``num_classes`` square) of class ids."""
    targets, predictions = np.asarray(targets, np.int64), np.asarray(predictions, np.int64)
    if targets.shape != predictions.shape or targets.ndim != 1:
        raise ValueError(f"targets {targets.shape} and predictions {predictions.shape} differ")
    for name, ids in (("targets", targets), ("predictions", predictions)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} hold class ids outside 0..{num_classes - 1}")
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def map_at_k(scores: np.ndarray, labels: np.ndarray, k: int = 3) -> float:
    """Mean average precision at ``k`` of single-label ``(N, C)`` scores (DCASE 2018 Task 2).

    Each clip scores ``1 / rank`` of its one true label among the classes ranked by score,
    or 0 past rank ``k``. ``labels`` holds the ``N`` class ids. Equal scores rank the lower
    class id first, as a stable ``argsort(-scores)`` lists them. NaN for no clip.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores {scores.shape} must be (N, C) and labels {labels.shape} (N,)")
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= scores.shape[1]
    ):
        raise ValueError(f"labels must be class ids in 0..{scores.shape[1] - 1}")
    if not len(labels):
        return float("nan")
    rows = np.arange(len(labels))
    true = scores[rows, labels][:, None]
    before = (scores > true) | ((scores == true) & (np.arange(scores.shape[1]) < labels[:, None]))
    rank = 1 + before.sum(axis=1)
    return float(np.mean(np.where(rank <= k, 1.0 / rank, 0.0)))


def write_per_class(
    path: str, result: Dict[str, Any], class_names: Optional[Sequence[str]] = None
) -> str:
    """Write each class's average precision and AUC of an evaluation to the CSV ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("index,label,average_precision,auc\n")
        for i, (ap, auc) in enumerate(zip(result["average_precision"], result["auc"])):
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            f.write(f'{i},"{name}",{ap:.6f},{auc:.6f}\n')
    return path


def mean_by_record(records: np.ndarray, *values: np.ndarray) -> Tuple[np.ndarray, ...]:
    """``(unique records, the mean of each of values per record...)``, records in order of
    their first row; the means keep each array's dtype.

    The rows of one record are its segments (``pipeline.make_eval_iterator`` with
    ``segments``); padding rows must be dropped first. A record's labels are equal on all its
    rows, so their mean is the record's labels.
    """
    records = np.asarray(records)
    unique, first, inverse = np.unique(records, return_index=True, return_inverse=True)
    order = np.argsort(first)
    counts = np.bincount(inverse, minlength=len(unique))
    means = []
    for value in map(np.asarray, values):
        sums = np.zeros((len(unique),) + value.shape[1:], np.float64)
        np.add.at(sums, inverse, value)
        mean = sums / counts.reshape(-1, *[1] * (value.ndim - 1))
        means.append(mean[order].astype(value.dtype))
    return (unique[order], *means)
