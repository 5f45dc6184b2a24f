"""What a run learns: the loss on the model's outputs, the scores evaluation ranks, the metrics.

A :class:`Task` is chosen by name (``config.task``, or the ``task`` a checkpoint records), so
the training loop and the loader never branch on the kind of problem. Targets are always
``(B, C)`` float rows: multi-hot, or one-hot for a single label, mixed pairwise under mixup.
:func:`for_output` is the one rule that maps a head's activation to its task.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from panns_jax import metrics

MULTILABEL = "multilabel"
SINGLELABEL = "singlelabel"
# A checkpoint's ``extra`` entry naming the task it was trained for.
CHECKPOINT_KEY = "task"


class Task:
    """A loss, the scores evaluation ranks, and the metrics computed from them."""

    name: str = ""
    output: str = "sigmoid"  # Activation of a new head's clipwise_output (transfer).
    best_metric: str = "mAP"  # The metric the 'best' checkpoint maximises.
    summary_keys: Tuple[str, ...] = ("mAP", "mAUC", "d_prime")  # Logged and printed.

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        raise NotImplementedError

    def scores(self, outputs: Dict[str, jax.Array]) -> jax.Array:
        """Per-class scores that evaluation ranks (probabilities)."""
        return outputs["clipwise_output"]

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
        return metrics.evaluate(scores, targets)

    def evaluate_rows(
        self, scores: np.ndarray, targets: np.ndarray, records: Optional[np.ndarray] = None
    ) -> Dict[str, Any]:
        """:meth:`evaluate` and ``num_examples`` of scored rows; per recording when
        ``records`` names each row's recording (its segments' scores averaged)."""
        if records is not None:
            _, scores, targets = metrics.mean_by_record(records, scores, targets)
        result = self.evaluate(scores, targets)
        result["num_examples"] = len(targets)
        return result

    def summary(self, result: Mapping[str, Any]) -> str:
        """The ``summary_keys`` of an evaluation as one line, e.g. ``mAP 0.4312  mAUC ...``.

        Raises KeyError, naming the key, for a result that is not one of this task's.
        """
        missing = [k for k in self.summary_keys if k not in result]
        if missing:
            raise KeyError(f"not a {self.name} result: it has no {missing}")
        return "  ".join(f"{k} {float(result[k]):.4f}" for k in self.summary_keys)


class MultiLabelTask(Task):
    """Audio tagging as in the paper: BCE on the sigmoid outputs, scored by mAP, mAUC and d'."""

    name = MULTILABEL

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        return binary_cross_entropy(outputs["clipwise_output"], targets)


class SingleLabelTask(Task):
    """One class per clip (the paper's six transfer sets): softmax cross-entropy on the logits.

    Accuracy counts the top-scoring class being a label of the clip. ``map_at_3``, the
    metric of DCASE 2018 Task 2 (:func:`panns_jax.metrics.map_at_k`), scores the rank of
    the clip's label within the top 3. mAP, mAUC and d' are reported beside them, per class
    one against the rest, and the confusion matrix of the top-scoring classes.
    """

    name = SINGLELABEL
    output = "softmax"
    best_metric = "accuracy"
    summary_keys = ("accuracy", "map_at_3", "mAP", "mAUC", "d_prime")

    def loss(self, outputs: Dict[str, jax.Array], targets: jax.Array) -> jax.Array:
        logits = outputs["logits"].astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    def scores(self, outputs: Dict[str, jax.Array]) -> jax.Array:
        return jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)

    def evaluate(self, scores: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
        result = metrics.evaluate(scores, targets)
        scores, targets = np.asarray(scores), np.asarray(targets)
        top = np.argmax(scores, axis=1)
        result["accuracy"] = float(np.mean(targets[np.arange(len(top)), top] > 0.5))
        result["map_at_3"] = metrics.map_at_k(scores, np.argmax(targets, axis=1), k=3)
        result["confusion_matrix"] = metrics.confusion_matrix(
            np.argmax(targets, axis=1), top, targets.shape[1]
        )
        return result


TASKS = {MULTILABEL: MultiLabelTask, SINGLELABEL: SingleLabelTask}


def get(name: Optional[str]) -> Task:
    """The task called ``name``; None or empty means the paper's multi-label tagging."""
    name = name or MULTILABEL
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()


def for_output(output: str) -> str:
    """The task a head's activation implies: ``singlelabel`` for softmax, else ``multilabel``."""
    return SINGLELABEL if output == "softmax" else MULTILABEL


def binary_cross_entropy(probabilities: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean BCE on probabilities, as PyTorch's ``BCELoss`` computes it.

    Each log is clamped at -100, and the gradient is ``(p - t) / max(p (1 - p), 1e-12)``.
    That gradient stays finite where a saturated sigmoid rounds ``p`` to exactly 0 or 1,
    where differentiating the clamped logs would give 0 * inf = NaN.
    """
    return _bce(probabilities.astype(jnp.float32), targets.astype(jnp.float32))


def _bce_terms(p: jax.Array) -> Tuple[jax.Array, jax.Array]:
    return jnp.maximum(jnp.log(p), -100.0), jnp.maximum(jnp.log1p(-p), -100.0)


@jax.custom_vjp
def _bce(p: jax.Array, targets: jax.Array) -> jax.Array:
    log_p, log_not_p = _bce_terms(p)
    return -jnp.mean(targets * log_p + (1 - targets) * log_not_p)


def _bce_fwd(p, targets):
    return _bce(p, targets), (p, targets)


def _bce_bwd(residuals, g):
    p, targets = residuals
    scale = g / p.size
    log_p, log_not_p = _bce_terms(p)
    return (scale * (p - targets) / jnp.maximum(p * (1 - p), 1e-12), scale * (log_not_p - log_p))


_bce.defvjp(_bce_fwd, _bce_bwd)
