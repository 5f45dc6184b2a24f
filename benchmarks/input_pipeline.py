r"""Training input pipeline throughput on AudioSet-shaped data.

Writes a synthetic original-style HDF5 pack (10 s, 32 kHz int16 clips, 1-3 of
527 classes each, class frequencies Zipf-skewed so that the balanced sampler
has real work to do), builds it with the `audioset` TFDS builder (ArrayRecord),
then times `make_train_iterator` over all 527 classes.

"Per core" divides clips by the CPU seconds the whole process used (all
tf.data threads plus the Python consumer), so it does not depend on how many
cores the machine has. The records are in the page cache after the build: this
measures the pipeline's CPU cost, not the disk.

  python benchmarks/input_pipeline.py [--num_clips 1500] [--batches 60]

Reports glibc's default malloc and `tune_malloc()` (see panns_jax/malloc.py); ends
with the line `clips/s per core: <number>` for the balanced sampler with
tune_malloc(), the recommended setting.

Measured (balanced, 527 classes, batch 32 of 10 s clips, tune_malloc(); the
project's shared 2-core machine at a load average of 7-10, old and new code run
alternately): 770-936 clips/s per CPU-second before the #17 changes (6 runs),
1,464-1,905 after (4 runs: 1,791, 1,823, 1,464, 1,905). The spread is other
processes' load: the work is bound by memory traffic. Where the time went, per
batch of 32 (ms of CPU, before -> after): array_record's reader 10-16 -> 5-6 (a
pread per record into a reused buffer, `panns_jax/data/records.py`); TF copying
the 41 MB batch out of tf.numpy_function 8-10 -> ~0 (an aligned buffer TF adopts,
recycled once the caller drops the batch, most recently used first: it may still
be in cache); the sampler 1.4 -> 0.8 (each Feistel round's (key, round) hash
prefix computed once); int16 -> float32 ~7-8 (unchanged: the float32 batch is
twice the int16 it comes from); record parsing ~0.5 (unchanged).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import h5py
import numpy as np


def write_pack(
    path: str, num_clips: int, num_classes: int = 527, clip_samples: int = 320000, seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_classes + 1)  # Zipf: class 0 ~ 527x class 526
    weights /= weights.sum()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "audio_name",
            data=np.array([f"Y{i:011d}.wav".encode() for i in range(num_clips)], dtype="S20"),
        )
        wave = f.create_dataset("waveform", (num_clips, clip_samples), np.int16)
        target = np.zeros((num_clips, num_classes), bool)
        for i in range(num_clips):
            # Every class gets at least one clip; the rest follow the skew.
            first = i if i < num_classes else rng.choice(num_classes, p=weights)
            extra = rng.choice(num_classes, rng.integers(0, 3), p=weights)
            target[i, [first, *extra]] = True
            wave[i] = rng.integers(-3000, 3000, clip_samples, dtype=np.int16)
        f.create_dataset("target", data=target)
        f.attrs.create("sample_rate", data=32000, dtype=np.int32)


def measure(make, batches: int, warmup: int = 5):
    it = make()
    for _ in range(warmup):
        batch = next(it)
    clips = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(it)
        clips += batch["audio"].shape[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    it.close()  # Its prefetching threads would otherwise run into the next measurement.
    return clips / wall, clips / cpu, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_clips", type=int, default=1500)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--workdir", default=None, help="Keep the generated data here (default: temp dir)."
    )
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    from panns_jax import data as pdata  # pylint: disable=g-import-not-at-top
    from panns_jax import malloc as panns_malloc  # pylint: disable=g-import-not-at-top

    logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()

    workdir = args.workdir or tempfile.mkdtemp(prefix="panns_bench_")
    try:
        manual = os.path.join(workdir, "manual")
        pack = os.path.join(manual, "hdf5s", "waveforms", "balanced_train.h5")
        t = time.perf_counter()
        if not os.path.exists(pack):
            write_pack(pack, args.num_clips)
            print(f"wrote the HDF5 pack in {time.perf_counter() - t:.0f} s")
            t = time.perf_counter()
        builder = pdata.Audioset(data_dir=os.path.join(workdir, "tfds"))
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual)
            )
        builder = pdata.Audioset(data_dir=os.path.join(workdir, "tfds"))
        print(
            f"prepared {builder.info.splits['balanced_train'].num_examples} clips "
            f"in {time.perf_counter() - t:.0f} s"
        )

        def make(balanced):
            return lambda: pdata.make_train_iterator(
                builder,
                "balanced_train",
                batch_size=args.batch_size,
                clip_samples=320000,
                balanced=balanced,
                seed=0,
                process_index=0,
                process_count=1,
            )

        num_classes = len(make(True)().sampler.class_ids)
        results = {}
        # glibc defaults first (mallopt cannot be undone), then tune_malloc().
        for malloc in ("default malloc", "tune_malloc()"):
            if malloc == "tune_malloc()" and not panns_malloc.tune_malloc():
                print("tune_malloc() unavailable (not glibc)")
            for name, balanced in [("uniform", False), ("balanced", True)]:
                wall, per_core, cores = measure(make(balanced), args.batches)
                results[malloc, name] = per_core
                print(
                    f"{malloc:15s} {name:9s}: {wall:6.0f} clips/s wall, "
                    f"{per_core:6.0f} clips/s per CPU-second ({cores:.2f} cores busy)"
                    + (f", {num_classes} classes" if balanced else "")
                )
        print("(recommended setting: tune_malloc(); balanced sampler)")
        print(f"clips/s per core: {results['tune_malloc()', 'balanced']:.0f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
