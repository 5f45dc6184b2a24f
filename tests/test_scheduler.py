"""The chunk scheduler, with a stand-in model: batching by length across recordings,
results in input order, and failures confined to their recording."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest

from panns_jax.scheduler import ChunkScheduler


class Model:
    """``sum`` and ``first`` of each row; records every batch's shape. Rows whose first
    sample is NaN give a NaN sum; a length in ``rejects`` raises like a model that cannot
    take it."""

    def __init__(self, rejects: Tuple[int, ...] = ()):
        self.calls: List[Tuple[int, int]] = []
        self.rejects = rejects

    def __call__(self, x: np.ndarray, keys: Tuple[str, ...]):
        self.calls.append(x.shape)
        if x.shape[1] in self.rejects:
            raise ValueError(f"cannot take {x.shape[1]} samples")
        out = {"sum": x.sum(axis=1), "first": x[:, 0]}
        return {k: out[k] for k in keys}


def chunks(start: float, n: int, length: int) -> List[np.ndarray]:
    return [np.full(length, start + i, np.float32) for i in range(n)]


def feed(scheduler: ChunkScheduler, recordings, fail_at=None):
    """Open, add and close each recording, collecting ready results after each one."""
    results = []
    for name, pieces in recordings:
        index = scheduler.open(name)
        for c, piece in enumerate(pieces):
            scheduler.add(index, c * len(piece), piece)
        if fail_at == name:
            scheduler.fail(index, f"{name}: unreadable")
        else:
            scheduler.close(index, sum(map(len, pieces)), [f"{name} note"])
        results += list(scheduler.ready())
    return results + list(scheduler.drain())


def test_equal_lengths_run_together_across_recordings_in_input_order():
    model = Model()
    scheduler = ChunkScheduler(model, ["sum"], batch_size=4, window=10)
    recordings = [("a", chunks(0, 3, 10)), ("b", chunks(10, 1, 7)), ("c", chunks(20, 3, 10))]
    results = feed(scheduler, recordings)
    assert [r.source for r in results] == ["a", "b", "c"]
    # a's 3 chunks and c's first fill a batch of 4; c's last two and b's 7-sample chunk
    # run at the end.
    assert sorted(model.calls) == sorted([(4, 10), (2, 10), (1, 7)])
    for result, (_, pieces) in zip(results, recordings):
        assert result.error is None and result.warnings == [f"{result.source} note"]
        np.testing.assert_array_equal(result.outputs["sum"], [p.sum() for p in pieces])
        assert result.starts.tolist() == [c * len(pieces[0]) for c in range(len(pieces))]
        assert result.window == min(10, result.num_samples)
        assert list(result.outputs) == ["sum"]
    # Negative control: one call per chunk is what the batching saves.
    assert len(model.calls) < sum(len(p) for _, p in recordings)


def test_failures_stay_with_their_recording():
    model = Model(rejects=(7,))
    scheduler = ChunkScheduler(model, ["sum", "first"], batch_size=2, window=10)
    nan = chunks(0, 5, 10)
    nan[2][0] = np.nan  # One bad chunk in the middle of five (three batches).
    recordings = [
        ("nan", nan),
        ("rejected", chunks(1, 1, 7)),
        ("unreadable", chunks(2, 1, 10)),
        ("good", chunks(3, 3, 10)),
    ]
    results = feed(scheduler, recordings, fail_at="unreadable")
    assert [r.source for r in results] == ["nan", "rejected", "unreadable", "good"]
    assert results[0].error == (
        "nan: the model produced non-finite sum, first (NaN/Inf); check the checkpoint "
        "and the input's scale"
    )
    assert results[1].error == "rejected: cannot take 7 samples"
    assert results[2].error == "unreadable: unreadable"
    for failed in results[:3]:
        assert failed.outputs == {} and failed.starts.size == 0
    good = results[3]
    assert good.error is None
    np.testing.assert_array_equal(good.outputs["first"], [3, 4, 5])
    # Rows run: nan's first four (its fifth came after it failed) and good's three; the
    # unreadable recording's queued chunk never reaches the model.
    assert sum(rows for rows, length in model.calls if length == 10) == 4 + 3


def test_a_failed_recording_ignores_later_chunks_and_is_handed_back_once():
    model = Model()
    scheduler = ChunkScheduler(model, ["sum"], batch_size=2, window=10)
    index = scheduler.open("x")
    scheduler.add(index, 0, np.full(10, np.nan, np.float32))
    scheduler.add(index, 10, np.ones(10, np.float32))  # A full batch: runs, fails x.
    assert scheduler.failed(index)
    scheduler.add(index, 20, np.ones(10, np.float32))  # Ignored: x has failed.
    assert scheduler.pending == 0
    (result,) = scheduler.ready()
    assert "non-finite sum" in result.error
    assert list(scheduler.drain()) == [] and model.calls == [(2, 10)]


def test_pending_chunks_are_bounded():
    model = Model()
    scheduler = ChunkScheduler(model, ["sum"], batch_size=2, window=100)
    index = scheduler.open("many lengths")
    for length in range(1, 12):  # Distinct lengths never fill a batch of their own.
        scheduler.add(index, 0, np.ones(length, np.float32))
        assert scheduler.pending <= 4 * 2
    assert model.calls  # More than 4 x batch size pending: every length ran.
    scheduler.close(index, 11)
    (result,) = scheduler.drain()
    np.testing.assert_array_equal(result.outputs["sum"], np.arange(1, 12))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_results_do_not_depend_on_the_batch_size(batch_size):
    rng = np.random.default_rng(batch_size)
    recordings = [
        (f"r{i}", [rng.standard_normal(8).astype(np.float32) for _ in range(int(n))])
        for i, n in enumerate(rng.integers(1, 6, 5))
    ]
    results = feed(ChunkScheduler(Model(), ["sum"], batch_size, window=8), recordings)
    for result, (_, pieces) in zip(results, recordings):
        np.testing.assert_allclose(result.outputs["sum"], [p.sum() for p in pieces], rtol=1e-6)
