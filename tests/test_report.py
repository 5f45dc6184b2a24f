"""Result pictures: PNGs drawn on their own figures, leaving matplotlib's backend and pyplot's
figures alone."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from panns_jax import report

PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path) -> tuple:
    assert path.read_bytes()[:8] == PNG
    shape = matplotlib.image.imread(str(path)).shape
    assert shape[0] > 0 and shape[1] > 0
    return shape


def test_pictures_are_pngs_and_leave_matplotlib_alone(tmp_path):
    import matplotlib.pyplot as pyplot  # As a program that plots for itself has.

    backend = matplotlib.get_backend()
    assert pyplot.get_fignums() == []
    names = ["cat", "dog", "bird"]

    counts = report.confusion_matrix_png(
        tmp_path / "pairs.png", ([0, 1, 2, 2], [0, 1, 1, 2]), names
    )
    np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    report.confusion_matrix_png(tmp_path / "matrix.png", counts, names, title="kNN")
    assert _check_png(tmp_path / "pairs.png") == _check_png(tmp_path / "matrix.png")
    ap = {"cat": 0.9, "dog": None, "bird": math.nan, "fish": 0.3}
    report.per_class_ap_png(tmp_path / "ap.png", ap)
    _check_png(tmp_path / "ap.png")

    written = report.results_pngs(str(tmp_path / ""), dict(zip(names, [1.0, 0.5, 0.2])), counts)
    assert sorted(written) == ["confusion_matrix", "per_class_ap"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ap.png",
        "confusion_matrix.png",
        "matrix.png",
        "pairs.png",
        "per_class_ap.png",
    ]
    assert matplotlib.get_backend() == backend and pyplot.get_fignums() == []


def test_bad_pictures_are_refused_before_a_file_is_made(tmp_path):
    with pytest.raises(ValueError, match="3x3"):
        report.confusion_matrix_png(tmp_path / "m.png", np.eye(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="no classes"):
        report.per_class_ap_png(tmp_path / "ap.png", {})
    assert list(tmp_path.iterdir()) == []
