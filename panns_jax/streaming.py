"""Streaming sound event detection: audio in blocks of any size, probabilities and events out.

    panns-jax stream recording.wav --checkpoint DIR --block 0.02
    panns-jax stream --mic --model MobileNetV1 --checkpoint DIR

    tagger = StreamingTagger(model, variables, window=1.0, hop=0.25)
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

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from panns_jax import loader, models

DEFAULT_WINDOW = 1.0  # Seconds of context per prediction (clip models).
DEFAULT_SED_WINDOW = 3.2  # Decision-level models: 10 segments of 32 frames (Cnn14).
DEFAULT_HOP = 0.25  # Seconds between predictions.
DEFAULT_RANDOM_MODEL = "MobileNetV1"  # `stream` without --checkpoint or --model: a fast one.


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
        if not 0.0 <= off <= on <= 1.0:
            raise ValueError(f"need 0 <= off_threshold <= on_threshold <= 1, got {off}, {on}")
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
      model, variables: a panns_jax model and its ``{'params', 'batch_stats'}``.
      window: seconds of audio per prediction (default 1 s, 3.2 s for SED models).
      hop: seconds between predictions; a multiple of the model's frame hop.
      on_threshold, off_threshold: event hysteresis.
      labels: class names (default: AudioSet's 527 for 527 classes, else indices).
      predict: optional ``(1, window samples) -> {output: array}`` replacing the
        jitted JAX model, e.g. ``panns_jax.export.load('m.onnx')``.
    """

    def __init__(
        self,
        model: Any,
        variables: Optional[Mapping[str, Any]] = None,
        *,
        window: Optional[float] = None,
        hop: float = DEFAULT_HOP,
        on_threshold: float = 0.5,
        off_threshold: float = 0.3,
        labels: Optional[Sequence[str]] = None,
        predict: Optional[Callable[[np.ndarray], Mapping[str, Any]]] = None,
        decision_level: Optional[bool] = None,
    ):
        self.model = model
        self.sample_rate = models.sample_rate(model)
        self.frame_hop = model.frontend.hop_size
        if decision_level is None:
            decision_level = models.outputs(model).decision_level
        self.decision_level = decision_level
        if window is None:
            window = DEFAULT_SED_WINDOW if self.decision_level else DEFAULT_WINDOW
        for value, what in ((window, "window"), (hop, "hop")):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{what} must be a positive, finite number of seconds, got {value!r}"
                )
        self.window = int(round(window * self.sample_rate))
        self.hop = int(round(hop * self.sample_rate))
        if self.hop % self.frame_hop or self.window % self.frame_hop:
            raise ValueError(
                f"window and hop must be multiples of the frame hop "
                f"({self.frame_hop / self.sample_rate * 1000:g} ms), got "
                f"{window} s and {hop} s"
            )
        if not 0 < self.hop <= self.window:
            raise ValueError(f"need 0 < hop <= window, got hop {hop} s, window {window} s")
        if self.window < model.frontend.window_size:
            raise ValueError(f"window {window} s is shorter than one STFT window")
        if predict is None:
            if variables is None:
                raise ValueError("give the model's variables or a predict function")
            params = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
            key = "framewise_output" if self.decision_level else "clipwise_output"
            forward = jax.jit(lambda v, x: model.apply(v, x)[key])
            predict = lambda x: {key: forward(params, x)}  # noqa: E731
        self._predict = predict
        self._key = "framewise_output" if self.decision_level else "clipwise_output"
        num_classes = getattr(model, "num_classes", 527)
        if labels is None:
            from panns_jax import audio

            labels = (
                audio.audioset_labels()
                if num_classes == 527
                else [f"class {i}" for i in range(num_classes)]
            )
        if len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for a {num_classes}-class model")
        self.labels = list(labels)
        self._events = Hysteresis(num_classes, on_threshold, off_threshold, self.labels)
        self.reset()

    # -- stream state ---------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream: empty buffer, all classes off."""
        self._buffer = RingBuffer(self.window)
        self._next_end = self.window  # Sample count at which the next window ends.
        self._events.active[:] = False

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


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _import_sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as err:  # OSError: PortAudio library missing.
        raise ImportError(
            f"--mic needs sounddevice and PortAudio ({err}): pip install "
            "'panns_jax[stream]' (and e.g. apt-get install libportaudio2)"
        ) from None
    return sounddevice


def _mic_blocks(sample_rate: int, block: int, device: Optional[str]) -> Iterator[np.ndarray]:
    """Blocks from the default (or named) input device via sounddevice, mono float32."""
    sd = _import_sounddevice()
    import queue

    blocks: "queue.Queue[np.ndarray]" = queue.Queue()

    def callback(indata, frames, time_info, status):  # Audio thread: hand over, no work.
        if status:
            print(f"warning: {status}", file=sys.stderr)
        blocks.put(indata[:, 0].copy())

    def generate() -> Iterator[np.ndarray]:
        with sd.InputStream(
            samplerate=sample_rate,
            blocksize=block,
            channels=1,
            dtype="float32",
            device=device,
            callback=callback,
        ):
            print(f"listening at {sample_rate} Hz (Ctrl-C to stop)", file=sys.stderr)
            while True:
                yield blocks.get()

    return generate()  # Not a generator itself: a missing sounddevice fails right away.


def _file_blocks(path: str, sample_rate: int, block: int, notes: List[str]) -> Iterator[np.ndarray]:
    """Blocks of ``block`` samples of a file, decoded and resampled in bounded memory."""
    from panns_jax import audio

    pending = np.zeros(0, np.float32)
    for decoded in audio.decoded_blocks(path, sample_rate, notes=notes):
        pending = np.concatenate([pending, decoded])
        while pending.size >= block:
            yield pending[:block]
            pending = pending[block:]
    if pending.size:
        yield pending


def main_stream(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax stream FILE | --mic``: print sound events as they are detected."""
    parser = argparse.ArgumentParser(
        prog="panns-jax stream",
        description="Streaming sound event detection: simulates a live "
        "stream from an audio file, or listens to a microphone (--mic).",
    )
    parser.add_argument("file", nargs="?", help="audio file streamed in blocks")
    parser.add_argument("--mic", action="store_true", help="read the microphone (sounddevice)")
    parser.add_argument("--device", default=None, help="--mic: input device name or index")
    loader.add_arguments(
        parser,
        checkpoint_default="none, a randomly initialised --model",
        model_default="MobileNetV1",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        help=f"seconds per prediction (default {DEFAULT_WINDOW:g}; "
        f"{DEFAULT_SED_WINDOW:g} for decision-level models)",
    )
    parser.add_argument(
        "--hop", type=float, default=DEFAULT_HOP, help="seconds between predictions"
    )
    parser.add_argument("--block", type=float, default=0.02, help="seconds of audio per block")
    parser.add_argument("--on-threshold", type=float, default=0.5)
    parser.add_argument("--off-threshold", type=float, default=0.3)
    parser.add_argument(
        "--realtime", action="store_true", help="FILE: feed blocks at the speed of a live stream"
    )
    parser.add_argument(
        "--frames", action="store_true", help="also print the top class of every frame"
    )
    args = parser.parse_args(argv)
    if bool(args.file) == args.mic:
        parser.error("give an audio FILE or --mic (not both)")

    notes: List[str] = []
    try:
        for value, option in (
            (args.window, "--window"),
            (args.hop, "--hop"),
            (args.block, "--block"),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{option} must be a positive, finite number of seconds, got {value:g}"
                )
        if args.block < 0.001:
            raise ValueError(
                f"--block {args.block:g} s is below 1 ms; use blocks of at least one millisecond"
            )
        if args.mic:
            _import_sounddevice()  # Fail before loading a model.
        elif not os.path.isfile(args.file):
            raise FileNotFoundError(f"{args.file}: no such file")
        model, variables, meta = loader.load(
            args.checkpoint,
            model=args.model or (None if args.checkpoint else DEFAULT_RANDOM_MODEL),
            overrides=args.overrides,
        )
        if meta.kind == "random":
            print(
                f"warning: no checkpoint given; {meta.name} is randomly initialised, so its "
                "events are meaningless (this demonstrates the pipeline only)",
                file=sys.stderr,
            )
        tagger = StreamingTagger(
            model,
            variables,
            window=args.window,
            hop=args.hop,
            on_threshold=args.on_threshold,
            off_threshold=args.off_threshold,
            labels=meta.labels,
        )
        block = max(1, int(round(args.block * tagger.sample_rate)))
        if args.mic:
            blocks = _mic_blocks(tagger.sample_rate, block, args.device)
        else:
            blocks = _file_blocks(args.file, tagger.sample_rate, block, notes)
        tagger.warm_up()
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"# {type(model).__name__}: window {tagger.window / tagger.sample_rate:g} s, hop "
        f"{tagger.hop / tagger.sample_rate:g} s, warm-up {tagger.warmup_seconds:g} s",
        file=sys.stderr,
    )
    compute, started = 0.0, time.perf_counter()
    try:
        for i, samples in enumerate(blocks):
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            notes.clear()
            if args.realtime and not args.mic:
                time.sleep(max(0.0, started + i * block / tagger.sample_rate - time.perf_counter()))
            for step in tagger.push(samples):
                compute += step.compute_seconds
                if args.frames:
                    for t, p in zip(step.times, step.probabilities):
                        top = int(np.argmax(p))
                        label = tagger.labels[top]
                        print(f"{t:8.2f} s  frame   {label} ({p[top]:.2f})")
                for event in step.events:
                    print(event, flush=True)
    except KeyboardInterrupt:
        pass
    except ValueError as err:  # An unreadable file (audio.AudioError) or non-finite output.
        from panns_jax import audio

        where = "" if isinstance(err, audio.AudioError) else f"{args.file or 'microphone'}: "
        print(f"error: {where}{err}", file=sys.stderr)
        return 1
    for event in tagger.flush():
        print(event)
    seconds = tagger._buffer.total / tagger.sample_rate
    if not args.mic and tagger._buffer.total < tagger.window:
        fit = tagger._buffer.total // tagger.frame_hop * tagger.frame_hop / tagger.sample_rate
        hop = min(tagger.hop / tagger.sample_rate, fit)
        print(
            f"error: {args.file}: {seconds:.3f} s of audio is shorter than the "
            f"{tagger.warmup_seconds:g} s window, so nothing was tagged; pass e.g. --window "
            f"{fit:g} --hop {hop:g}",
            file=sys.stderr,
        )
        return 1
    if seconds:
        print(
            f"# {seconds:.2f} s of audio; model compute {compute:.2f} s "
            f"(real-time factor {compute / seconds:.3f})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main_stream())
