"""The chunk scheduler: chunks of many recordings batched by length, results in input order.

    scheduler = ChunkScheduler(predict, ["clipwise_output"], batch_size=8, window=320000)
    index = scheduler.open("a.wav")
    scheduler.add(index, start, samples)        # every chunk of the recording
    scheduler.close(index, num_samples)         # or scheduler.fail(index, "a.wav: why")
    for result in scheduler.ready(): ...        # the recordings that are complete, in order
    for result in scheduler.drain(): ...        # at the end: run what is left

Chunks of equal length run together (``predict`` gets a ``(B, L)`` batch of at most
``batch_size`` rows), across recordings too, so many short files cost few model calls.
Recordings are numbered in the order they are opened and come back in that order, each
as one :class:`ChunkedOutput`. A recording that fails (its reader's error, a length the
model rejects, non-finite outputs) comes back with ``error`` set and never stops the
others. The scheduler holds at most about ``4 * batch_size`` chunks: when more are
pending, every length is run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# ``(B, L)`` float32 waveforms and the output names -> name -> array with B rows.
Predict = Callable[[np.ndarray, Tuple[str, ...]], Mapping[str, np.ndarray]]


@dataclasses.dataclass
class ChunkedOutput:
    """Model outputs for the chunks of one recording.

    Attributes:
      source: the file path, or ``'<waveform>'``.
      starts: start sample of each chunk, ``(n,)``.
      window: samples per chunk (the whole recording when it fits one window).
      num_samples: length of the recording at the model's sample rate.
      outputs: output name -> array ``(n, ...)``, row i for chunk i.
      error: why the recording failed (outputs are then empty).
      warnings: why its results may mislead (truncated, silent or far too loud).
    """

    source: str
    starts: np.ndarray
    window: int
    num_samples: int
    outputs: Dict[str, np.ndarray]
    error: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Recording:
    """What the scheduler knows of one recording while its chunks are in flight."""

    name: str
    starts: List[int] = dataclasses.field(default_factory=list)
    outputs: Dict[int, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    num_samples: int = 0
    closed: bool = False
    error: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.error is not None or (self.closed and len(self.outputs) == len(self.starts))

    def result(self, window: int, keys: Sequence[str]) -> ChunkedOutput:
        if self.error:
            return ChunkedOutput(self.name, np.zeros(0, np.int64), window, 0, {}, self.error)
        outputs = {k: np.stack([self.outputs[c][k] for c in range(len(self.starts))]) for k in keys}
        return ChunkedOutput(
            self.name,
            np.asarray(self.starts, np.int64),
            min(window, self.num_samples),
            self.num_samples,
            outputs,
            warnings=self.warnings,
        )


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A chunk waiting for its batch: recording, chunk number, samples."""

    index: int
    chunk: int
    samples: np.ndarray


class ChunkScheduler:
    """Batches chunks of equal length through ``predict``; see the module docstring.

    Args:
      predict: ``(waveforms (B, L), keys) -> {key: (B, ...)}``; a ``ValueError`` means the
        model rejects that length and fails the recordings of the batch.
      keys: the outputs to compute and keep.
      batch_size: the most rows per call of ``predict``.
      window: samples per chunk, reported in each result (the recording's length when
        shorter).
    """

    def __init__(self, predict: Predict, keys: Sequence[str], batch_size: int, window: int):
        self._predict = predict
        self.keys = tuple(keys)
        self.batch_size = batch_size
        self.window = window
        self._recordings: Dict[int, _Recording] = {}
        self._groups: Dict[int, List[_Pending]] = {}  # Chunk length -> chunks waiting.
        self._opened = 0  # Recordings opened so far; the next one's index.
        self._next = 0  # The next recording to hand back.

    @property
    def pending(self) -> int:
        """Chunks waiting for a batch."""
        return sum(map(len, self._groups.values()))

    def open(self, name: str) -> int:
        """Start a recording; returns its index (0, 1, ... in the order opened)."""
        index = self._opened
        self._recordings[index] = _Recording(name)
        self._opened += 1
        return index

    def failed(self, index: int) -> bool:
        """Whether recording ``index`` has failed (its further chunks are ignored)."""
        recording = self._recordings.get(index)
        return recording is not None and recording.error is not None

    def add(self, index: int, start: int, samples: np.ndarray) -> None:
        """Queue the chunk of recording ``index`` that begins at sample ``start``."""
        recording = self._recordings[index]
        if recording.error is not None:
            return
        recording.starts.append(start)
        length = len(samples)
        group = self._groups.setdefault(length, [])
        group.append(_Pending(index, len(recording.starts) - 1, samples))
        if len(group) >= self.batch_size:
            self._run(length)
        elif self.pending > 4 * self.batch_size:  # Bound memory: many distinct lengths.
            self._run_all()

    def close(self, index: int, num_samples: int, warnings: Sequence[str] = ()) -> None:
        """Every chunk of recording ``index`` is queued; it is ``num_samples`` long."""
        recording = self._recordings[index]
        recording.num_samples = num_samples
        recording.warnings = list(warnings)
        recording.closed = True

    def fail(self, index: int, message: str) -> None:
        """Recording ``index`` failed: keep its first error, drop its waiting chunks."""
        recording = self._recordings[index]
        recording.error = recording.error or message
        for length, group in list(self._groups.items()):
            self._groups[length] = [item for item in group if item.index != index]

    def ready(self) -> Iterator[ChunkedOutput]:
        """The complete recordings at the front of the queue, in input order."""
        while self._next in self._recordings and self._recordings[self._next].complete:
            yield self._recordings.pop(self._next).result(self.window, self.keys)
            self._next += 1

    def drain(self) -> Iterator[ChunkedOutput]:
        """Run every waiting chunk, then hand back every complete recording."""
        self._run_all()
        yield from self.ready()

    def _run_all(self) -> None:
        for length in list(self._groups):
            self._run(length)

    def _run(self, length: int) -> None:
        """Run the waiting chunks of ``length`` samples in batches of ``batch_size``."""
        items = self._groups.pop(length, [])
        for begin in range(0, len(items), self.batch_size):
            batch = [item for item in items[begin : begin + self.batch_size] if self._live(item)]
            if not batch:
                continue
            try:
                out = self._predict(np.stack([item.samples for item in batch]), self.keys)
            except ValueError as err:  # The model rejects this length.
                for item in batch:
                    self.fail(item.index, f"{self._recordings[item.index].name}: {err}")
                continue
            for row, item in enumerate(batch):
                self._store(item, {k: np.asarray(v[row]) for k, v in out.items()})

    def _live(self, item: _Pending) -> bool:
        return item.index in self._recordings and not self.failed(item.index)

    def _store(self, item: _Pending, values: Dict[str, np.ndarray]) -> None:
        """One chunk's outputs; non-finite values fail the recording, never a NaN result."""
        if not self._live(item):  # An earlier row of this batch failed the recording.
            return
        recording = self._recordings[item.index]
        bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
        if bad:  # Damaged weights or extreme input.
            self.fail(
                item.index,
                f"{recording.name}: the model produced non-finite {', '.join(bad)} (NaN/Inf); "
                "check the checkpoint and the input's scale",
            )
            return
        recording.outputs[item.chunk] = values
