"""Pictures of evaluation results: a confusion matrix and each class's average precision.

Each picture is drawn on its own :class:`matplotlib.figure.Figure` with an Agg canvas and
saved as PNG, never through pyplot or the global backend, so that a program that plots
for itself keeps its own figures and backend. ``panns-jax probe`` and ``panns-jax finetune``
write them next to their JSON results.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from panns_jax import fileio, metrics

ConfusionInput = Union[np.ndarray, Tuple[Sequence[int], Sequence[int]]]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> None:
    """Write ``fig`` to ``path`` as PNG in one rename (no half-written picture)."""
    with fileio.staged(path) as staging, open(staging, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def confusion_matrix_png(
    path: str, matrix_or_pairs: ConfusionInput, class_names: Sequence[str], title: str = ""
) -> np.ndarray:
    """Draw a confusion matrix (counts, or ``(targets, predictions)`` class ids) to ``path``;
    rows are the true classes, each cell shaded by its share of its row. Returns the counts."""
    if isinstance(matrix_or_pairs, tuple):
        matrix = metrics.confusion_matrix(*matrix_or_pairs, num_classes=len(class_names))
    else:
        matrix = np.asarray(matrix_or_pairs)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} classes must be {n}x{n}, got {matrix.shape}")
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.4 * n, 30)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # Counts stay legible up to about this many classes.
        for (i, j), count in np.ndenumerate(matrix):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    _save(fig, path)
    return matrix


def per_class_ap_png(
    path: str, ap_by_class: Mapping[str, Optional[float]], title: str = ""
) -> None:
    """Draw each class's average precision as a horizontal bar to ``path``, best first;
    classes without an AP (None or NaN: no positive example) are listed last, without a bar."""
    values = {k: (math.nan if v is None else float(v)) for k, v in ap_by_class.items()}
    if not values:
        raise ValueError("no classes to draw")
    order = sorted(values, key=lambda k: (math.isnan(values[k]), -np.nan_to_num(values[k])))
    shown = [0.0 if math.isnan(values[k]) else values[k] for k in order]
    fig = _figure(8, min(2 + 0.25 * len(order), 60))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(order)), shown, color="tab:blue")
    ax.set_yticks(range(len(order)), labels=order, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    finite = [v for v in values.values() if not math.isnan(v)]
    mean = f"mAP {np.mean(finite):.3f}" if finite else "no AP"
    ax.set_title(f"{title}  ({mean})" if title else mean)
    fig.tight_layout()
    _save(fig, path)


def results_pngs(
    directory: str,
    ap_by_class: Mapping[str, Optional[float]],
    confusion: Optional[np.ndarray] = None,
    *,
    suffix: str = "",
    title: str = "",
) -> Dict[str, str]:
    """The pictures of one evaluation in ``directory``: ``per_class_ap<suffix>.png`` and,
    when ``confusion`` is given (single-label tasks), ``confusion_matrix<suffix>.png`` with
    the classes of ``ap_by_class`` in order. Returns picture kind -> path."""
    written = {}
    if confusion is not None:
        path = os.path.join(directory, f"confusion_matrix{suffix}.png")
        confusion_matrix_png(path, np.asarray(confusion), list(ap_by_class), title=title)
        written["confusion_matrix"] = path
    path = os.path.join(directory, f"per_class_ap{suffix}.png")
    per_class_ap_png(path, ap_by_class, title=title)
    written["per_class_ap"] = path
    return written
