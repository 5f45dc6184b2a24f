"""mAP@k (panns_jax.metrics.map_at_k) against a loop over its definition, and the single-label
task reporting it. (mAP, AUC and d' against scikit-learn are in test_train.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from panns_jax import metrics, tasks


def _map_at_k_by_definition(scores, labels, k):
    """For each clip: its classes listed by score, high to low (equal scores: lower class id
    first); 1 / position of the true label when within the first k, else 0. The mean."""
    total = 0.0
    for row, label in zip(scores, labels):
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], c))
        top = ranked[:k]
        total += 1.0 / (top.index(label) + 1) if label in top else 0.0
    return total / len(labels)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_map_at_k_equals_its_definition_with_and_without_ties(seed, k):
    rng = np.random.default_rng(seed)
    n, c = 50, 7
    labels = rng.integers(0, c, n)
    continuous = rng.random((n, c))
    coarse = np.round(rng.random((n, c)) * 3) / 3  # Four levels: many equal scores.
    coarse[: n // 5] = 0.5  # Rows of all-equal scores: the rank is the class id + 1.
    for scores in (continuous, coarse):
        want = _map_at_k_by_definition(scores, labels, k)
        assert metrics.map_at_k(scores, labels, k=k) == pytest.approx(want, rel=1e-12)


def test_map_at_k_known_values_and_a_negative_control():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    # True label at rank 1, 2, 3 and (a tie with class 0, listed first) 2.
    labels = np.array([1, 1, 0, 1])
    assert metrics.map_at_k(scores, labels, k=3) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert metrics.map_at_k(scores, labels, k=1) == pytest.approx(1 / 4)  # Accuracy.
    assert metrics.map_at_k(scores, labels, k=2) == pytest.approx((1 + 1 / 2 + 0 + 1 / 2) / 4)
    # Negative control: the definition tells a wrong implementation apart, e.g. one scoring
    # every top-k hit as 1 (top-k accuracy) instead of 1 / rank.
    rng = np.random.default_rng(9)
    scores, labels = rng.random((40, 6)), rng.integers(0, 6, 40)
    ranks = 1 + (scores > scores[np.arange(40), labels][:, None]).sum(1)
    top3_accuracy = float(np.mean(ranks <= 3))
    assert not np.isclose(top3_accuracy, _map_at_k_by_definition(scores, labels, 3))
    assert metrics.map_at_k(scores, labels, k=3) != pytest.approx(top3_accuracy)
    assert np.isnan(metrics.map_at_k(np.zeros((0, 3)), np.zeros(0, int)))


@pytest.mark.parametrize(
    "scores, labels, k, match",
    [
        (np.zeros(3), np.zeros(3, int), 3, "must be \\(N, C\\)"),
        (np.zeros((3, 2)), np.zeros(2, int), 3, "must be \\(N, C\\)"),
        (np.zeros((2, 2)), np.array([0, 2]), 3, "class ids in 0..1"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), 3, "class ids"),
        (np.zeros((2, 2)), np.array([0, 1]), 0, "positive integer"),
    ],
)
def test_map_at_k_refuses_bad_arguments(scores, labels, k, match):
    with pytest.raises(ValueError, match=match):
        metrics.map_at_k(scores, labels, k=k)


def test_the_single_label_task_reports_map_at_3():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 30)
    scores = rng.random((30, 5))
    result = tasks.get(tasks.SINGLELABEL).evaluate(scores, np.eye(5)[labels])
    assert result["map_at_3"] == pytest.approx(_map_at_k_by_definition(scores, labels, 3))
    assert result["accuracy"] == pytest.approx(metrics.map_at_k(scores, labels, k=1))
    assert "map_at_3" in tasks.get(tasks.SINGLELABEL).summary(result)
    assert "map_at_3" not in tasks.get(tasks.MULTILABEL).evaluate(scores, np.eye(5)[labels])


def test_d_prime_is_scipys_probit():
    """sqrt(2) * Phi^-1(AUC) as scipy.stats computes it, edges included; a wrong scale
    (Phi^-1 without sqrt(2)) is far outside the tolerance."""
    from scipy.stats import norm

    aucs = np.concatenate([np.random.default_rng(0).uniform(0, 1, 200), [1e-12, 0.5, 1 - 1e-9]])
    got = np.array([metrics.d_prime(a) for a in aucs])
    want = np.sqrt(2.0) * norm.ppf(aucs)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert metrics.d_prime(0.0) == -np.inf and metrics.d_prime(1.0) == np.inf
    assert np.isnan(metrics.d_prime(float("nan")))
    assert not np.allclose(norm.ppf(aucs[:-3]), want[:-3], rtol=1e-3)


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    targets = [0, 0, 1, 2, 2, 2]
    predictions = [0, 1, 1, 2, 0, 2]
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    matrix = metrics.confusion_matrix(targets, predictions, 3)
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64
    swapped = metrics.confusion_matrix(predictions, targets, 3)  # Rows and columns trade places.
    np.testing.assert_array_equal(swapped, expected.T)
    assert not np.array_equal(swapped, matrix)
    np.testing.assert_array_equal(metrics.confusion_matrix([], [], 2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.confusion_matrix([0, 3], [0, 0], 3)


def test_singlelabel_evaluation_holds_the_confusion_matrix_of_its_top_classes():
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    targets = np.eye(3)[[0, 2, 2, 1]]
    result = tasks.get("singlelabel").evaluate(scores, targets)
    np.testing.assert_array_equal(result["confusion_matrix"], [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    assert result["accuracy"] == np.trace(result["confusion_matrix"]) / 4


def test_mean_by_record_averages_the_rows_of_each_recording_in_first_seen_order():
    values = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0], [7.0, 1.0]], np.float32)
    records = np.array([4, 4, 9, 2, 9])
    got_records, means = metrics.mean_by_record(records, values)
    np.testing.assert_array_equal(got_records, [4, 9, 2])
    np.testing.assert_allclose(means, [[2.0, 1.0], [6.0, 3.0], [0.0, 4.0]])
    assert means.dtype == np.float32
    # Negative control: rows of other recordings must not mix in.
    _, wrong = metrics.mean_by_record(np.array([4, 4, 9, 9, 2]), values)
    assert not np.allclose(wrong, means)
