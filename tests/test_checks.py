"""The value checks: each refuses what it must with its one message, and passes what is
valid through unchanged (the negative control of every refusal)."""

from __future__ import annotations

import numpy as np
import pytest

from panns_jax import checks

REFUSED = [
    (lambda: checks.positive_seconds(0, "--window"), "--window must be a positive, finite "),
    (lambda: checks.positive_seconds(0.0, "--window"), "number of seconds, got 0"),
    (lambda: checks.positive_seconds(float("nan"), "hop"), "hop must be a positive, finite"),
    (lambda: checks.positive_seconds(float("inf"), "w"), "got inf"),
    (lambda: checks.positive_seconds(-1, "hop_s"), "got -1"),
    (lambda: checks.positive_seconds("ten", "w"), "w must be a number of seconds, got 'ten'"),
    (lambda: checks.positive_seconds(True, "w"), "w must be a number of seconds, got True"),
    (lambda: checks.hop_seconds(1e-5, "--hop"), "--hop 1e-05 s is below 0.01 s; finer hops"),
    (lambda: checks.hop_seconds(-1, "--hop"), "--hop must be a positive"),
    (lambda: checks.hop_seconds(5e-4, "t", minimum=0.001), "t 0.0005 s is below 0.001 s"),
    (lambda: checks.hop_within_window(2.0, 1.0), "need 0 < hop <= window, got hop 2 s, window"),
    (lambda: checks.hop_within_window(0, 1.0), "need 0 < hop <= window"),
    (lambda: checks.batch_size(0), "batch size must be an integer in 1..1024, got 0"),
    (lambda: checks.batch_size(1025), "got 1025"),
    (lambda: checks.batch_size(2.0), "got 2.0"),
    (lambda: checks.batch_size(True), "got True"),
    (lambda: checks.top_k(0), "top-k must be a positive integer, got 0"),
    (lambda: checks.top_k(1.5), "top-k must be a positive integer, got 1.5"),
    (lambda: checks.positive_integer(-2, "batch size"), "batch size must be a positive integer"),
    (lambda: checks.probability(1.5), "threshold must be a probability in [0, 1], got 1.5"),
    (lambda: checks.probability(float("nan")), "threshold must be a probability"),
    (lambda: checks.probability("0.5"), "got '0.5'"),
    (lambda: checks.hysteresis(0.3, 0.5), "need 0 <= off_threshold <= on_threshold <= 1"),
    (lambda: checks.hysteresis(1.2, 0.5), "need 0 <= off_threshold"),
    (lambda: checks.labels_fit(["a"], 5), "1 labels for a 5-class model"),
]


@pytest.mark.parametrize("call, message", REFUSED, ids=[m for _, m in REFUSED])
def test_refusals_name_the_value(call, message):
    with pytest.raises(ValueError) as raised:
        call()
    assert message in str(raised.value)


def test_valid_values_pass_through():
    assert checks.positive_seconds(2, "w") == 2.0 and checks.positive_seconds("0.5", "w") == 0.5
    assert checks.positive_seconds(np.float32(0.25), "w") == 0.25
    assert checks.hop_seconds(0.01, "--hop") == 0.01
    assert checks.hop_seconds(0.001, "t", minimum=0.001) == 0.001
    checks.hop_within_window(1.0, 1.0)
    assert checks.batch_size(1) == 1 and checks.batch_size(np.int64(1024)) == 1024
    assert checks.top_k(np.int32(3)) == 3 and checks.positive_integer(7, "x") == 7
    assert checks.probability(0) == 0.0 and checks.probability(np.float32(1.0)) == 1.0
    checks.hysteresis(0.5, 0.5)
    checks.hysteresis(0.5, 0.0)
    checks.labels_fit(["a", "b"], 2)
