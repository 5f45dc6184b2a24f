"""Throughput of the jitted log-mel front end vs librosa, on this machine, as a ratio.

    python benchmarks/frontend.py [--batch 32] [--repeats 5]

Both compute the paper's log-mel of 10 s clips at 32 kHz (Hann 1024, hop 320,
64 Slaney mels 50-14000 Hz, 10*log10(max(mel, 1e-10))); librosa runs clip by clip
in float32 as a typical data-loader front end would.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import librosa
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

from panns_jax import frontend as fe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = fe.FrontendConfig()
    clips = np.random.default_rng(0).uniform(-1, 1, (args.batch, 10 * config.sample_rate))
    clips = clips.astype(np.float32)

    logmel = jax.jit(lambda x: fe.logmel(x, config))
    device_clips = jax.device_put(clips)
    jax_time = best_time(lambda: logmel(device_clips).block_until_ready(), args.repeats)

    def librosa_batch():
        for clip in clips:
            mel = librosa.feature.melspectrogram(
                y=clip,
                sr=config.sample_rate,
                n_fft=config.window_size,
                hop_length=config.hop_size,
                window="hann",
                center=True,
                pad_mode="reflect",
                power=2.0,
                n_mels=config.mel_bins,
                fmin=config.fmin,
                fmax=config.fmax,
            )
            librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)

    librosa_time = best_time(librosa_batch, max(1, args.repeats // 2))
    ours, theirs = args.batch / jax_time, args.batch / librosa_time
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}")
    print(f"panns_jax jitted log-mel: {ours:9.1f} clips/s (10 s clips)")
    print(f"librosa log-mel:          {theirs:9.1f} clips/s (10 s clips)")
    print(f"ratio panns_jax / librosa: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
