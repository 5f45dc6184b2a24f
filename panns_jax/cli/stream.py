"""``panns-jax stream FILE | --mic``: print sound events as they are detected.

    panns-jax stream recording.wav --checkpoint DIR --block 0.02 --realtime
    panns-jax stream --mic --model MobileNetV1 --checkpoint DIR

A file is decoded and resampled block by block (bounded memory) and fed to
:class:`panns_jax.streaming.StreamingTagger` as a live stream would be; ``--mic`` reads the
default (or ``--device``) input through sounddevice. Exit status: 0, 1 when the audio or
the model's output fails mid-stream or the file is shorter than one window, 2 on bad setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import sys
import time
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np

from panns_jax import audio, checks, loader
from panns_jax.cli import infer
from panns_jax.streaming import DEFAULT_HOP, DEFAULT_SED_WINDOW, DEFAULT_WINDOW, StreamingTagger

DEFAULT_RANDOM_MODEL = "MobileNetV1"  # `stream` without --checkpoint or --model: a fast one.
MIN_BLOCK_S = 0.001


def build_parser() -> argparse.ArgumentParser:
    """The ``panns-jax stream`` parser."""
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
        model_default=DEFAULT_RANDOM_MODEL,
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
    infer.add_cache_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``panns-jax stream FILE | --mic``: print sound events as they are detected."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.file) == args.mic:
        parser.error("give an audio FILE or --mic (not both)")
    notes: List[str] = []
    try:
        check_arguments(args)
        if infer.wants_compilation_cache(args):
            infer.enable_compilation_cache()
        tagger = _tagger(args)
        block = max(1, int(round(args.block * tagger.sample_rate)))
        blocks = _blocks(args, tagger.sample_rate, block, notes)
        tagger.warm_up()
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"# {type(tagger.model).__name__}: window {tagger.window / tagger.sample_rate:g} s, "
        f"hop {tagger.hop / tagger.sample_rate:g} s, warm-up {tagger.warmup_seconds:g} s",
        file=sys.stderr,
    )
    try:
        compute = _drive(tagger, blocks, block, args, notes)
    except ValueError as err:  # An unreadable file (audio.AudioError) or non-finite output.
        where = "" if isinstance(err, audio.AudioError) else f"{args.file or 'microphone'}: "
        print(f"error: {where}{err}", file=sys.stderr)
        return 1
    for event in tagger.flush():
        print(event)
    return _summary(tagger, args, compute)


def check_arguments(args: argparse.Namespace) -> None:
    """Option values and the input, before a model is loaded; ValueError naming the option."""
    for value, option in ((args.window, "--window"), (args.hop, "--hop"), (args.block, "--block")):
        if value is not None:
            checks.positive_seconds(value, option)
    if args.block < MIN_BLOCK_S:
        raise ValueError(
            f"--block {args.block:g} s is below 1 ms; use blocks of at least one millisecond"
        )
    checks.hysteresis(args.on_threshold, args.off_threshold)
    if args.mic:
        import_sounddevice()  # Fail before loading a model.
    elif not os.path.isfile(args.file):
        raise FileNotFoundError(f"{args.file}: no such file")


def _tagger(args: argparse.Namespace) -> StreamingTagger:
    """The model of ``--checkpoint`` / ``--model`` (random weights said on stderr)."""
    module, variables, meta = loader.load(
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
    return StreamingTagger(
        module,
        variables,
        meta,
        window=args.window,
        hop=args.hop,
        on_threshold=args.on_threshold,
        off_threshold=args.off_threshold,
    )


def _blocks(
    args: argparse.Namespace, sample_rate: int, block: int, notes: List[str]
) -> Iterator[np.ndarray]:
    if args.mic:
        return MicBlocks(sample_rate, block, args.device).blocks()
    return file_blocks(args.file, sample_rate, block, notes)


def _drive(
    tagger: StreamingTagger,
    blocks: Iterator[np.ndarray],
    block: int,
    args: argparse.Namespace,
    notes: List[str],
) -> float:
    """Feed every block, printing events (and frames) as they come; returns the model's
    compute seconds. Ctrl-C ends the stream like the end of a file."""
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
                    _print_frames(tagger, step.times, step.probabilities)
                for event in step.events:
                    print(event, flush=True)
    except KeyboardInterrupt:
        pass
    return compute


def _print_frames(tagger: StreamingTagger, times: np.ndarray, probabilities: np.ndarray) -> None:
    for t, p in zip(times, probabilities):
        top = int(np.argmax(p))
        print(f"{t:8.2f} s  frame   {tagger.labels[top]} ({p[top]:.2f})")


def _summary(tagger: StreamingTagger, args: argparse.Namespace, compute: float) -> int:
    """The real-time factor on stderr; exit status 1 for a file shorter than one window."""
    seen = tagger.samples_seen
    seconds = seen / tagger.sample_rate
    if not args.mic and seen < tagger.window:
        fit = seen // tagger.frame_hop * tagger.frame_hop / tagger.sample_rate
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


# ----------------------------------------------------------------------------
# Audio sources.
# ----------------------------------------------------------------------------


def import_sounddevice() -> Any:
    """The sounddevice module, or ImportError saying how to install it and PortAudio."""
    try:
        import sounddevice
    except (ImportError, OSError) as err:  # OSError: PortAudio library missing.
        raise ImportError(
            f"--mic needs sounddevice and PortAudio ({err}): pip install "
            "'panns_jax[stream]' (and e.g. apt-get install libportaudio2)"
        ) from None
    return sounddevice


@dataclasses.dataclass
class MicBlocks:
    """Blocks from the default (or named) input device via sounddevice, mono float32.

    The audio thread only hands each block to a queue; :meth:`blocks` yields them.
    """

    sample_rate: int
    block: int
    device: Optional[str] = None
    arrived: "queue.Queue[np.ndarray]" = dataclasses.field(default_factory=queue.Queue, init=False)

    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """sounddevice's audio-thread callback: hand the block over, no work."""
        if status:
            print(f"warning: {status}", file=sys.stderr)
        self.arrived.put(indata[:, 0].copy())

    def blocks(self) -> Iterator[np.ndarray]:
        """The stream's blocks, forever; a missing sounddevice fails here, not when read."""
        sd = import_sounddevice()
        return self._listen(sd)

    def _listen(self, sd: Any) -> Iterator[np.ndarray]:
        with sd.InputStream(
            samplerate=self.sample_rate,
            blocksize=self.block,
            channels=1,
            dtype="float32",
            device=self.device,
            callback=self.callback,
        ):
            print(f"listening at {self.sample_rate} Hz (Ctrl-C to stop)", file=sys.stderr)
            while True:
                yield self.arrived.get()


def file_blocks(path: str, sample_rate: int, block: int, notes: List[str]) -> Iterator[np.ndarray]:
    """Blocks of ``block`` samples of a file, decoded and resampled in bounded memory;
    decoding warnings (a truncated file) are appended to ``notes``."""
    pending = np.zeros(0, np.float32)
    for decoded in audio.decoded_blocks(path, sample_rate, notes=notes):
        pending = np.concatenate([pending, decoded])
        while pending.size >= block:
            yield pending[:block]
            pending = pending[block:]
    if pending.size:
        yield pending


if __name__ == "__main__":
    sys.exit(main())
