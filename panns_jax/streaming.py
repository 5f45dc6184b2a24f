"""Streaming sound event detection: audio in blocks of any size, probabilities and events out.

    panns-jax stream recording.wav --checkpoint DIR --block 0.02   # panns_jax.cli.stream
    panns-jax stream --mic --model MobileNetV1 --checkpoint DIR

    tagger = StreamingTagger(*loader.load("ckpt/mobilenetv1"), window=1.0, hop=0.25)
    for block in blocks:                      # any sizes, e.g. 10 ms ... 1 s
        for step in tagger.push(block):
            step.times, step.probabilities    # (n,), (n, classes)
            step.events                       # onsets / offsets (threshold + hysteresis)

How it works. The tagger keeps a ring buffer of the last ``window`` seconds of audio.
Every ``hop`` seconds of input it runs the model on the buffer (one compiled shape,
``(1, window)``), so that the output equals the same window applied offline
(:func:`offline_frames`), whatever the block sizes:

* clip models (Cnn14, MobileNetV1, ...): one frame per hop, the window's
  ``clipwise_output``, time-stamped at the window's end;
* decision-level models (``Cnn14_DecisionLevel*``): the window's
  ``framewise_output`` (10 ms frames) of the newest ``hop`` of audio, so that every
  frame is emitted once; the first window also emits its earlier frames.

Warm-up and latency. Nothing is emitted before ``window`` seconds of audio have
arrived (the warm-up; 1 s by default). After that, a window ends every ``hop``
seconds: a sound is reported at most ``hop`` (+ the block size when blocks are
longer than the hop) + the model's compute time after its samples arrive; for
decision-level models the frame time stamps are exact, for clip models the
event time is the end of the first window that crossed the threshold (the sound
began within the preceding ``window``).

Events use hysteresis per class: on when the probability reaches ``on_threshold``,
off when it drops below ``off_threshold`` (< on), so a probability hovering at
the threshold does not flicker.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from panns_jax import checks, loader, models, sed

DEFAULT_WINDOW = 1.0  # Seconds of context per prediction (clip models).
DEFAULT_SED_WINDOW = 3.2  # Decision-level models: 10 segments of 32 frames (Cnn14).
DEFAULT_HOP = 0.25  # Seconds between predictions.

Predict = Callable[[np.ndarray], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Event:
    """A class switching on (``onset``) or off (``offset``) at ``time`` seconds."""

    kind: str  # 'onset' or 'offset'.
    time: float
    index: int
    label: str
    probability: float

    def __str__(self) -> str:
        return f"{self.time:8.2f} s  {self.kind:<6}  {self.label} ({self.probability:.2f})"


@dataclasses.dataclass
class Step:
    """What one window produced: its frames' times and probabilities, and events."""

    times: np.ndarray  # (n,) seconds from the start of the stream.
    probabilities: np.ndarray  # (n, classes) float32.
    events: List[Event]
    compute_seconds: float  # Wall time of the model call.


class RingBuffer:
    """The last ``size`` samples of a stream (zeros before any arrive)."""

    def __init__(self, size: int):
        self._data = np.zeros(size, np.float32)
        self._end = 0  # Write position.
        self.total = 0  # Samples written since the start.

    def write(self, samples: np.ndarray) -> None:
        self.total += samples.size
        samples = samples[-self._data.size :]  # Older samples would be overwritten anyway.
        n = samples.size
        first = min(n, self._data.size - self._end)
        self._data[self._end : self._end + first] = samples[:first]
        self._data[: n - first] = samples[first:]
        self._end = (self._end + n) % self._data.size

    def latest(self) -> np.ndarray:
        """The buffer in time order, oldest first (a copy)."""
        return np.concatenate([self._data[self._end :], self._data[: self._end]])


class Hysteresis:
    """Per-class on/off state: on at ``p >= on``, off at ``p < off``."""

    def __init__(self, num_classes: int, on: float, off: float, labels: Sequence[str]):
        checks.hysteresis(on, off)
        self.on, self.off = on, off
        self.active = np.zeros(num_classes, bool)
        self.labels = labels

    def update(self, times: np.ndarray, probabilities: np.ndarray) -> List[Event]:
        events = []
        for t, p in zip(times, probabilities):
            switch_on = ~self.active & (p >= self.on)
            switch_off = self.active & (p < self.off)
            for i in np.flatnonzero(switch_on | switch_off):
                events.append(
                    Event(
                        "onset" if switch_on[i] else "offset",
                        float(t),
                        int(i),
                        self._label(i),
                        float(p[i]),
                    )
                )
            self.active = (self.active | switch_on) & ~switch_off
        return events

    def close(self, time_s: float) -> List[Event]:
        """Offsets for every class still on at the end of the stream."""
        events = [
            Event("offset", time_s, int(i), self._label(i), float("nan"))
            for i in np.flatnonzero(self.active)
        ]
        self.active[:] = False
        return events

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else str(i)


class StreamingTagger:
    """Sliding-window tagger over a ring buffer; see the module docstring.

    Args:
      module, variables, metadata: what :func:`panns_jax.loader.load` returns; the
        metadata gives the labels and whether the model is decision-level.
      window: seconds of audio per prediction (default 1 s, 3.2 s for SED models).
      hop: seconds between predictions; a multiple of the model's frame hop.
      on_threshold, off_threshold: event hysteresis.
      predict: optional ``(1, window samples) -> {output: array}`` replacing the
        jitted JAX model, e.g. ``panns_jax.export.load('m.onnx')``; ``variables`` may
        then be None.
    """

    def __init__(
        self,
        module: Any,
        variables: Optional[Mapping[str, Any]],
        metadata: loader.Metadata,
        *,
        window: Optional[float] = None,
        hop: float = DEFAULT_HOP,
        on_threshold: float = 0.5,
        off_threshold: float = 0.3,
        predict: Optional[Predict] = None,
    ):
        self.model = module
        self.sample_rate = models.sample_rate(module)
        self.frame_hop = module.frontend.hop_size
        self.decision_level = metadata.outputs.decision_level
        self._key = sed.output_key(metadata.outputs)
        self.window, self.hop = self._chunking(window, hop)
        self._predict = predict or self._jitted(variables)
        self.labels = list(metadata.labels)
        checks.labels_fit(self.labels, getattr(module, "num_classes", 527))
        self._events = Hysteresis(len(self.labels), on_threshold, off_threshold, self.labels)
        self.reset()

    def _chunking(self, window: Optional[float], hop: float) -> Tuple[int, int]:
        """Window and hop in samples: positive, whole frames, hop within the window."""
        if window is None:
            window = DEFAULT_SED_WINDOW if self.decision_level else DEFAULT_WINDOW
        sr = self.sample_rate
        window_samples = int(round(checks.positive_seconds(window, "window") * sr))
        hop_samples = int(round(checks.positive_seconds(hop, "hop") * sr))
        if hop_samples % self.frame_hop or window_samples % self.frame_hop:
            raise ValueError(
                f"window and hop must be multiples of the frame hop "
                f"({self.frame_hop / sr * 1000:g} ms), got {window} s and {hop} s"
            )
        checks.hop_within_window(hop_samples / sr, window_samples / sr)
        if window_samples < self.model.frontend.window_size:
            raise ValueError(f"window {window} s is shorter than one STFT window")
        return window_samples, hop_samples

    def _jitted(self, variables: Optional[Mapping[str, Any]]) -> Predict:
        """The module's output for one window, jitted, as a ``predict`` function."""
        if variables is None:
            raise ValueError("give the model's variables or a predict function")
        params = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        module, key = self.model, self._key
        forward = models.jit_inference(module, lambda v, x: module.apply(v, x)[key])
        return lambda x: {key: forward(params, x)}

    # -- stream state ---------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream: empty buffer, all classes off."""
        self._buffer = RingBuffer(self.window)
        self._next_end = self.window  # Sample count at which the next window ends.
        self._events.active[:] = False

    @property
    def samples_seen(self) -> int:
        """Samples pushed since the start (or the last :meth:`reset`)."""
        return self._buffer.total

    @property
    def warmup_seconds(self) -> float:
        """Audio needed before the first output."""
        return self.window / self.sample_rate

    @property
    def latency_seconds(self) -> float:
        """Worst-case delay from a sample's arrival to the window that includes it,
        excluding compute and block buffering (= hop)."""
        return self.hop / self.sample_rate

    def warm_up(self) -> None:
        """Compile the model now rather than on the first window."""
        self._predict(np.zeros((1, self.window), np.float32))

    def push(self, block: np.ndarray) -> List[Step]:
        """Feed a block of mono float samples; returns the windows that completed."""
        block = np.asarray(block, np.float32).reshape(-1)
        steps = []
        while block.size:
            take = min(block.size, self._next_end - self._buffer.total)
            self._buffer.write(block[:take])
            block = block[take:]
            if self._buffer.total == self._next_end:
                steps.append(self._run_window())
                self._next_end += self.hop
        return steps

    def flush(self) -> List[Event]:
        """End of stream: offsets for every class still on."""
        return self._events.close(self._buffer.total / self.sample_rate)

    def _run_window(self) -> Step:
        end = self._buffer.total
        start_time = time.perf_counter()
        output = self._predict(self._buffer.latest()[None])[self._key]
        output = np.asarray(jax.device_get(output), np.float32)[0]
        compute = time.perf_counter() - start_time
        if not np.all(np.isfinite(output)):  # Damaged weights: never silent non-events.
            raise ValueError(
                f"the model produced non-finite {self._key} (NaN/Inf) for the "
                f"window ending at {end / self.sample_rate:.2f} s; check the "
                "checkpoint and the input's scale"
            )
        times, probabilities = self._frames(output, end - self.window, first=end == self.window)
        return Step(times, probabilities, self._events.update(times, probabilities), compute)

    def _frames(self, output: np.ndarray, start: int, first: bool):
        """Map a window's output to absolute ``(times, probabilities)``."""
        if not self.decision_level:
            return np.array([(start + self.window) / self.sample_rate]), output[None]
        last = self.window // self.frame_hop  # Frames [last - hop, last): the newest hop.
        begin = 0 if first else last - self.hop // self.frame_hop
        frames = np.arange(begin, last)
        times = (start + frames * self.frame_hop) / self.sample_rate
        return times, output[begin:last]

    # -- offline reference ----------------------------------------------------

    def offline_frames(
        self, waveform: np.ndarray, batch_size: int = 8
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(times, probabilities)`` of the same windows applied directly to a recording.

        What :meth:`push` emits for that recording, computed by slicing it into windows
        (the streaming test's reference).
        """
        waveform = np.asarray(waveform, np.float32).reshape(-1)
        ends = list(range(self.window, waveform.size + 1, self.hop))
        all_times, all_probs = [], []
        for i in range(0, len(ends), batch_size):
            chunk = ends[i : i + batch_size]
            windows = np.stack([waveform[e - self.window : e] for e in chunk])
            out = np.asarray(jax.device_get(self._predict(windows)[self._key]), np.float32)
            for e, o in zip(chunk, out):
                times, probs = self._frames(o, e - self.window, first=e == self.window)
                all_times.append(times)
                all_probs.append(probs)
        if not all_times:
            return np.zeros(0), np.zeros((0, len(self.labels) or 0), np.float32)
        return np.concatenate(all_times), np.concatenate(all_probs)


def collect(steps: Iterable[Step]) -> Tuple[np.ndarray, np.ndarray, List[Event]]:
    """Concatenate steps into ``(times, probabilities, events)``."""
    steps = list(steps)
    if not steps:
        return np.zeros(0), np.zeros((0, 0), np.float32), []
    return (
        np.concatenate([s.times for s in steps]),
        np.concatenate([s.probabilities for s in steps]),
        [e for s in steps for e in s.events],
    )


def iter_blocks(waveform: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """Fixed-size blocks of a recording (the last may be shorter)."""
    for start in range(0, waveform.size, block):
        yield waveform[start : start + block]
